"""Triton kernels of CAST, shipped as ``cast.kernels``."""
