"""Store-versus-recompute: schedules, the simulator and the planners that emit them."""
