"""Triton kernels of fusionloader, installed as ``fusionloader.kernels``."""
