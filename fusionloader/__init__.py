"""fusionloader: on-the-fly diffusion augmentation for PyTorch."""
__version__ = "0.1.0"
