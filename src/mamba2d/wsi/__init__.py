"""Whole-slide image handling: tiling, feature extraction, patch grids."""
