"""ssl-path: self-supervised foundation encoders for pathology images."""

__version__ = "0.1.0"
