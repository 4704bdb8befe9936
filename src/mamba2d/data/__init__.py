"""Readers and writers of user data: feature bags, label and split files, and the real image
sources (Fashion-MNIST, its segmentation mosaics) the vision trainer uses."""
