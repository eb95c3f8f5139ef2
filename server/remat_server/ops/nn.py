"""Neural-network ops (to be filled)."""
