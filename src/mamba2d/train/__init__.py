"""Training and evaluation loops, configs and metrics."""
