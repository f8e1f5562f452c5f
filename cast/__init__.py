"""CAST: content-aware neural style transfer with fused masked high-order Gram kernels."""

from ._startup import quiet_signals_while_starting

# The `cast` command is imported through this file, and importing torch takes a second or two:
# a Ctrl-C or SIGTERM then ends the command with exit 130 or 143 and one line, not an import
# traceback or silence.
with quiet_signals_while_starting():
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
