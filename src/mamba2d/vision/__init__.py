"""Vision backbone built on the 2D scan for natural images."""
