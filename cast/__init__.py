"""CAST: content-aware neural style transfer with fused masked high-order Gram kernels."""

from .backends import BackendUnavailable
from .errors import CastError
from .losses import ContentLoss, GramStats, StyleLoss, TVLoss, high_order_kernels
from .ops import masked_gram
from .stylize import stylize
from .swap import swap

__all__ = [
    "BackendUnavailable",
    "CastError",
    "ContentLoss",
    "GramStats",
    "StyleLoss",
    "TVLoss",
    "high_order_kernels",
    "masked_gram",
    "stylize",
    "swap",
]
__version__ = "0.1.0"
