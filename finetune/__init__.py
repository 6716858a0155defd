"""Heads trained on top of an ssl-path encoder: segmentation, detection, classification."""
