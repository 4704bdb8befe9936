"""Layers built on the 2D scan: Mamba2D block, pad token, norms."""
