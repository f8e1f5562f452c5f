"""Launch helpers shared by CAST's Triton kernels.

Whether Triton's interpreter runs the kernels is decided once, when a kernel module is
imported: ``triton.jit`` reads ``TRITON_INTERPRET`` at decoration time.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..reference import gram_dtype

INTERPRETING = triton_interpreting()

TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    """The op's accumulation dtype (``cast.reference.gram_dtype``) as a Triton type."""
    return TRITON_DTYPES[gram_dtype(dtype)]


def dot_input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot``'s ``input_precision`` for float32 operands: TF32 tensor cores or full IEEE.

    float64 operands always take ``"ieee"`` (DMMA or FMA on sm80/sm90; TF32 means nothing there).
    """
    return "tf32" if allow_tf32 and dtype != torch.float64 else "ieee"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Whether dot operands rounded to ``dtype`` must be widened back to float32 first.

    Triton 3.9's interpreter multiplies bfloat16 dot operands as their raw uint16 bits, so
    under the interpreter bfloat16 operands are rounded to bfloat16 and then widened: the same
    products a GPU's bf16 MMA with float32 accumulation forms, computed in float32.
    """
    return INTERPRETING and dtype == torch.bfloat16


def dot_constexprs(dtype: torch.dtype, allow_tf32: bool) -> dict:
    """The kernels' precision constexprs for ``dtype`` input: accumulator, MMA operand dtype,
    ``tl.dot``'s input precision and whether float32 operands are rounded to TF32 first."""
    precision = dot_input_precision(dtype, allow_tf32)
    return dict(
        ACC_DTYPE=accumulator_dtype(dtype),
        DOT_DTYPE=TRITON_DTYPES[dtype],  # bf16/fp16 tensor cores with float32 accumulation
        UPCAST_DOT=upcast_dot_operands(dtype),
        INPUT_PRECISION=precision,
        ROUND_TF32=dtype == torch.float32 and precision == "tf32",
    )


def wide_offsets(C: int, N: int) -> bool:
    """Whether offsets within one batch item's ``C x N`` values (plus a stencil's reach) need
    64 bits; below that the kernels keep 32-bit offsets, half the registers."""
    return C * N >= 2**31 - 2**24


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The GPU's SMs; one on the interpreter."""
    if device.type != "cuda":
        return 1
    return _multiprocessors(device.index if device.index is not None else 0)


def programs_to_fill(sms: int) -> int:
    """How many programs keep every SM busy: two waves' worth."""
    return 2 * sms


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``tensor``'s GPU (Triton launches on the current device and its current stream)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def channel_blocks(C: int, block: int) -> int:
    return triton.cdiv(C, block)


def fits_channels(block: int, C: int) -> bool:
    """A channel block no wider than C rounded up to a power of two (and at least 16 for tl.dot)."""
    return block <= max(16, triton.next_power_of_2(C))
