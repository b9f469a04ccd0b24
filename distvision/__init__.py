"""distvision: distributed image classification and model training."""

__version__ = "0.1.0"
