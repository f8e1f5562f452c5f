"""``stylize``'s arguments checked before any work: numbers, device, backend, tensors and paths.

Every refusal is a ``CastError`` (a backend that is absent or does not take the input: the op's
``BackendUnavailable``), one line saying what is wrong and how to fix it, raised before the
network loads and before anything is written.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from . import backends, images, masks
from .errors import CastError, ImageError, MaskError

# Smallest long side: relu5_1 sits behind four 2x poolings, so 32 px leaves it a 2x2 grid.
MIN_SIZE = 32
# Smallest short side at the coarsest scale: one cell of relu5_1.
MIN_SHORT_SIDE = 16
# Largest long side: far beyond any memory, but small enough that sizes stay exact floats.
MAX_SIZE = 1 << 20
# Weights and step sizes multiply float32 tensors: beyond this they are inf.
FLOAT32_MAX = torch.finfo(torch.float32).max
# torch.Generator seeds are unsigned 64-bit numbers.
MAX_SEED = 2**64 - 1
# Largest step size: images live in [0, 1], and on the examples L-BFGS diverged within 3 steps
# at 1e6 (Adam moves every pixel by about lr on its first step). Beyond float32, torch fails.
MAX_LR = 1e6
# Largest style scale: a bound against typos (1e300 would ask for an astronomic style image).
MAX_STYLE_SCALE = 64.0
# Pixel and mask values may leave [0, 1] by float rounding, not more.
RANGE_SLACK = 1e-4


def whole(name: str, value, minimum: int, maximum: int | None = None) -> None:
    """``value`` is an int (not a bool) from ``minimum`` to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CastError(f"{name} must be a whole number, got {value!r}")
    _in_range(name, value, minimum, maximum, f"{maximum}")


def real(name: str, value, positive: bool = False, maximum: float = FLOAT32_MAX) -> None:
    """``value`` is a finite real number up to ``maximum``, ``>= 0`` (``> 0`` if ``positive``):
    a NaN, infinite or negative weight would only show up as a diverging loss."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CastError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise CastError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise CastError(f"{name} must be positive, got {value!r}")
    _in_range(name, value, 0, maximum, f"{maximum:.3g}")


def _in_range(name: str, value, minimum, maximum, shown_maximum: str) -> None:
    if value < minimum:
        wanted = {0: "0 or more", 1: "positive"}.get(minimum, f"at least {minimum}")
        raise CastError(f"{name} must be {wanted}, got {value!r}")
    if maximum is not None and value > maximum:
        raise CastError(f"{name} must be at most {shown_maximum}, got {value!r}")


def choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise CastError(f"unknown {name} {value!r}; choose {', '.join(allowed)}")


def sizes(size, iters, scales, save_every, output) -> None:
    whole("--size", size, MIN_SIZE, MAX_SIZE)
    whole("--iters", iters, 0)
    whole("--scales", scales, 1)
    # the most scales whose coarsest long side, size / 2**(scales - 1), is MIN_SIZE or more
    most = (size // MIN_SIZE).bit_length()
    if scales > most:
        raise CastError(
            f"{scales} scales at size {size} make the coarsest long side smaller than "
            f"{MIN_SIZE} px; lower --scales to {most} or raise --size"
        )
    if save_every is not None:
        whole("--save-every", save_every, 1)
        if output is None:
            raise CastError("--save-every needs an output path")


def device(value) -> torch.device:
    """The device to run on: ``value``, or CUDA when present, else the CPU."""
    try:
        found = torch.device(value or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise CastError(f"unknown device {value!r}; use cpu, cuda or cuda:N") from None
    if found.type not in ("cpu", "cuda"):
        raise CastError(f"device {found} is not supported; use cpu, cuda or cuda:N")
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise CastError(f"device {found} asked for but this torch sees no CUDA GPU; use cpu")
        count = torch.cuda.device_count()
        if found.index is not None and found.index >= count:
            raise CastError(
                f"device {found} asked for but there are {count} CUDA GPUs; "
                f"use an index below {count}"
            )
    return found


def backend(name: str | None, on: torch.device) -> None:
    """The masked Gram backend (``name``, else ``$CAST_BACKEND``, else the default) runs the
    network's float32 features on ``on``; ``BackendUnavailable`` says why not."""
    try:
        backends.choose(name, on, torch.float32)
    except ValueError as err:  # an unknown name, or a bad $CAST_BACKEND
        raise CastError(str(err)) from None


def image_tensor(image: Tensor, what: str) -> None:
    """A ``(3, H, W)`` floating RGB tensor in [0, 1]."""
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ImageError(
            f"{what} tensor must be (3, H, W) floating RGB, got {tuple(image.shape)} "
            f"{str(image.dtype).removeprefix('torch.')}"
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ImageError(f"{what} tensor is empty: {tuple(image.shape)}")
    _in_unit_range(image, what, ImageError, "scale 0-255 images by 1/255")


def mask_tensor(mask: Tensor, what: str, hw: tuple[int, int], regions: int | None) -> Tensor:
    """``(K, H', W')`` soft masks in [0, 1] of an image of size ``hw`` (same aspect ratio),
    with ``regions`` masks when given, as float32 on the CPU at ``hw``."""
    if mask.dim() == 2:
        mask = mask[None]
    shape = tuple(mask.shape)
    if mask.dim() != 3 or (regions is not None and shape[0] != regions) or 0 in shape:
        want = f"({regions}, H, W)" if regions else "(K, H, W) with K >= 1"
        raise MaskError(f"{what} tensor must be {want}, got {shape}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise MaskError(f"{what} tensor must be floating or bool, got {mask.dtype}")
    masks.check_aspect(f"{what} tensor", (shape[2], shape[1]), hw)
    mask = mask.detach().float().cpu()
    _in_unit_range(mask, what, MaskError, "masks hold 0 (outside) to 1 (inside)")
    return masks.resample(mask.clamp(0, 1), hw)


def _in_unit_range(values: Tensor, what: str, error: type[CastError], hint: str) -> None:
    low, high = values.detach().aminmax()  # NaN or inf when any value is
    if not (low.isfinite() and high.isfinite()):
        raise error(f"{what} tensor holds NaN or infinite values")
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise error(
            f"{what} tensor must hold values in [0, 1], got {low:.4g} to {high:.4g}; {hint}"
        )


def output(path, inputs: Sequence[tuple[str, object]]) -> None:
    """``path`` can be written (``images.check_writable``) and is none of ``inputs``, given as
    ``(what, path or tensor or None)``: writing the result over an input would lose it."""
    images.check_writable(path)
    if not os.path.exists(path):
        return
    for what, given in inputs:
        if isinstance(given, (str, os.PathLike)) and os.path.exists(given):
            if os.path.samefile(path, given):
                raise CastError(
                    f"the output '{path}' is the {what} '{given}'; writing it would lose the "
                    "input: choose another output path"
                )


def readable(files: Sequence[tuple[str, object, type[CastError]]]) -> None:
    """Every input file opens (headers only), so a bad path is reported before the weights
    load; ``files`` holds ``(what, path or tensor or None, error)``."""
    for what, file, error in files:
        if isinstance(file, (str, os.PathLike)):
            images.image_size(Path(file), what, error)
