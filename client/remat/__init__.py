"""remat SDK (being built)."""
