"""Datasets and loaders: slide feature bags, grid coordinates, image folders."""
