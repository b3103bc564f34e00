"""frogwatch: data-free spectral diagnostics and FROG sparse fine-tuning for PyTorch models."""

__version__ = "0.1.0"
