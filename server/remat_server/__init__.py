"""remat's server: graph IR, op library, autodiff, checkpoint planners, executor, service."""
