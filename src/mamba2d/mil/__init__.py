"""Multiple-instance learning models for whole-slide images built on the 2D scan."""
