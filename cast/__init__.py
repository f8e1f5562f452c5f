"""CAST: content-aware neural style transfer with fused masked high-order Gram kernels."""

from .backends import BackendUnavailable
from .ops import masked_gram

__all__ = ["BackendUnavailable", "masked_gram"]
__version__ = "0.1.0"
