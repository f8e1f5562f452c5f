"""The terms of CAST's objective as small ``nn.Module``s, and the high-order kernel presets.

Targets are buffers, so a loss moves with ``.to(device)`` and other PyTorch code can use it
alone; they are constants, kept detached from the graph that made them (else a second
``backward`` through a loss whose target came from a trainable network fails).

Style statistics are kept as masked Gram *sums* plus mask *mass* (``GramStats``), so regions
and several style images combine linearly: adding the statistics of two style images and
dividing once gives the Gram of their union.

Departures from the paper (Chen & Hsu 2016, after Gatys et al. 2016), each also commented where
it happens:

- each style term is a *relative* error ``||G - T||^2 / ||T||^2`` per kernel and region instead
  of Gatys' ``||G - T||^2 / (4 C^2)``, and the content term ``||F - P||^2 / ||P||^2``, so the
  weights mean the same for every layer, kernel and network (VGG-19 and HED's VGG-16 differ in
  activation scale by orders of magnitude);
- regions are weighted by their share of the content image's mask mass, so every pixel pulls
  equally and a small region cannot dominate;
- total variation is the mean squared difference of neighbouring pixels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CastError
from .ops import masked_gram, masked_gram_grad
from .reference import inverse, mask_mass


def _difference(dy: int, dx: int) -> Tensor:
    """3x3 kernel ``(x[n] - x[n + (dy, dx)]) / sqrt(2)``: unit gain on uncorrelated input."""
    # whatever the caller's default dtype and device
    kernel = torch.zeros(3, 3, dtype=torch.float32, device="cpu")
    kernel[1, 1] = 1.0
    kernel[1 + dy, 1 + dx] = -1.0
    return kernel / math.sqrt(2.0)


def _identity(r: int) -> Tensor:
    kernel = torch.zeros(r, r, dtype=torch.float32, device="cpu")
    kernel[r // 2, r // 2] = 1.0
    return kernel


HIGH_ORDER_PRESETS: dict[str, Tensor] = {
    "none": _identity(1)[None],
    "neighbours": torch.stack([_identity(3), _difference(0, 1), _difference(1, 0)]),
    "neighbours8": torch.stack(
        [_identity(3), _difference(0, 1), _difference(1, 0), _difference(1, 1), _difference(1, -1)]
    ),
}
HIGH_ORDER_PRESETS_DOC = """\
High-order kernels p_j, shape (J, r, r): every style layer's features are cross-correlated with
each kernel before the masked Gram matrix is taken, so a statistic can describe how features
co-occur at neighbouring positions, not only at one position.

- none        J=1, 1x1 identity: plain Gatys Gram matrices (what features occur together).
- neighbours  J=3, 3x3: identity, horizontal and vertical differences (x[n] - x[right]) / sqrt 2
              and (x[n] - x[below]) / sqrt 2. The Gram of a difference is about G - (S + S^T) / 2
              where S correlates each feature with its neighbour's, so matching it matches how
              features change across one step: stroke direction and texture scale, which plain
              Grams ignore.
- neighbours8 J=5, 3x3: as neighbours plus the two diagonal differences.
- a file      .npy, .pt or .txt holding (J, r, r) with r odd (.txt: J blocks of r rows, r numbers
              each, stacked vertically)."""

MAX_KERNELS = 64
# Kernel values are squared into Gram sums over up to ~1e7 positions of features up to ~1e4:
# within this bound the sums stay far below float32's 3.4e38.
MAX_KERNEL_VALUE = 1e4


def high_order_kernels(spec: str | Path) -> Tensor:
    """The kernels ``(J, r, r)`` (float32) of a preset name or a kernel file (see the presets)."""
    if isinstance(spec, str) and spec in HIGH_ORDER_PRESETS:
        return HIGH_ORDER_PRESETS[spec].clone()
    path = Path(spec)
    if not path.is_file():
        raise CastError(
            f"unknown high-order preset {str(spec)!r}; choose {', '.join(HIGH_ORDER_PRESETS)} "
            "or give a kernel file (.npy, .pt or .txt holding (J, r, r))"
        )
    suffix = path.suffix.lower()  # KERNELS.TXT as well, as image files of any case
    try:
        if suffix == ".npy":
            kernels = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".pt":
            kernels = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".txt":
            with warnings.catch_warnings():
                # a file without numbers is refused below by its shape, in one line
                warnings.simplefilter("ignore", UserWarning)
                rows = np.loadtxt(path, ndmin=2)
            r = rows.shape[1]
            if rows.shape[0] % r:
                raise ValueError(f"{rows.shape[0]} rows are not whole {r}x{r} kernels")
            kernels = torch.from_numpy(rows).reshape(-1, r, r)
        else:
            raise ValueError("the file type is not .npy, .pt or .txt")
    except Exception as err:
        raise CastError(f"cannot read kernel file {str(path)!r}: {err}") from None
    if (
        not isinstance(kernels, Tensor)
        or kernels.layout != torch.strided  # sparse tensors from a .pt file
        or not kernels.is_floating_point()
    ):
        raise CastError(f"kernel file {str(path)!r} must hold a floating-point (J, r, r) array")
    shape = tuple(kernels.shape)
    if (
        len(shape) != 3
        or not 1 <= shape[0] <= MAX_KERNELS
        or shape[1] != shape[2]
        or shape[1] % 2 == 0
    ):
        raise CastError(
            f"kernel file {str(path)!r} holds shape {shape}; expected (J, r, r) with "
            f"1 <= J <= {MAX_KERNELS} and r odd"
        )
    if not torch.isfinite(kernels).all() or not kernels.flatten(1).abs().sum(1).all():
        raise CastError(f"kernel file {str(path)!r} holds NaN, inf or an all-zero kernel")
    if kernels.abs().max() > MAX_KERNEL_VALUE:
        raise CastError(
            f"kernel file {str(path)!r} holds values up to {kernels.abs().max():.3g}; keep them "
            f"within +-{MAX_KERNEL_VALUE:g} (the Gram matrices square them in float32)"
        )
    return kernels.float().contiguous()


def gram_sums(
    features: Tensor, masks: Tensor, kernels: Tensor, *, backend: str | None = None
) -> Tensor:
    """``(B, J, K, C, C)`` masked Gram *sums* ``Y^T Y`` (not divided by the mask's mass), so the
    sums of disjoint masks (the tiles of an image) add up to the whole image's. Differentiable.
    """
    return masked_gram(features, masks, kernels, mass=1.0, backend=backend)


def gram_sums_grad(
    features: Tensor, masks: Tensor, kernels: Tensor, weight: Tensor, *,
    backend: str | None = None,
) -> Tensor:  # fmt: skip
    """The gradient of ``(weight * gram_sums(features, masks, kernels)).sum()`` with respect
    to ``features``, ``(B, C, H, W)``, without taking the sums (the op's backward alone).
    ``weight``: ``(B, J, K, C, C)``."""
    return masked_gram_grad(features, weight, masks, kernels, mass=1.0, backend=backend)


@dataclass(frozen=True)
class GramStats:
    """Masked high-order Gram statistics as sums plus mass, so they add.

    ``sums[j, k]`` is ``(M_k P_j F)^T (M_k P_j F)`` summed over images, ``(J, K, C, C)``;
    ``mass[k]`` is ``n_k = sum_n m_k[n]^2`` summed the same way, ``(K,)``. ``a + b`` pools the
    positions of both; ``mean()`` is the Gram of the pool.
    """

    sums: Tensor
    mass: Tensor

    @classmethod
    def of(
        cls, features: Tensor, masks: Tensor, kernels: Tensor, *, backend: str | None = None
    ) -> GramStats:
        """Statistics of ``features (B, C, H, W)`` under ``masks`` ``(K, H, W)``, or
        ``(B, K, H, W)`` one set per item, and ``kernels``, pooled over the batch."""
        sums = gram_sums(features, masks, kernels, backend=backend)
        mass = mask_mass(masks).to(sums.dtype).reshape(-1, sums.shape[2])  # (1 or B, K)
        return cls(sums.sum(0), mass.sum(0) * (features.shape[0] // mass.shape[0]))

    def __add__(self, other: GramStats) -> GramStats:
        return GramStats(self.sums + other.sums, self.mass + other.mass)

    def weighted(self, weight: float) -> GramStats:
        """The same Grams with mass ``weight`` in every region present: pooled with others, they
        then count by ``weight``, not by their area (neural-style's blend weights)."""
        factor = weight * inverse(self.mass)
        return GramStats(self.sums * factor[:, None, None], self.mass * factor)

    @property
    def present(self) -> Tensor:
        """``(K,)`` bool: regions with any mass."""
        return self.mass > 0

    def mean(self, fallback: Tensor | None = None) -> Tensor:
        """Gram ``(J, K, C, C)`` of each region; where a region has no mass, ``fallback``'s
        (``(J, K, C, C)``) if given, else zeros."""
        gram = self.sums * inverse(self.mass)[:, None, None]
        if fallback is not None:
            gram = torch.where(self.present[:, None, None], gram, fallback)
        return gram


class StyleLoss(nn.Module):
    """Masked high-order style loss of one layer (the CAST style term).

    Args:
        target: ``(J, K, C, C)`` target Gram of each kernel and region (``GramStats.mean()``).
        masks: ``(K, H, W)`` regions of the image being optimised, on this layer's grid; or
            ``None`` (then ``region_weights`` is needed) for a loss that only takes Grams
            already formed (``of_gram``), as a tiled objective does.
        kernels: ``(J, r, r)`` high-order kernels (``high_order_kernels``).
        region_weights: ``(K,)`` say of each region; default each region's share of the mask
            mass, so every pixel pulls equally (the paper leaves this open).
        backend: backend of ``cast.masked_gram``; default the fastest one present.

    ``forward(features (B, C, H, W))`` returns the scalar
    ``sum_jk w_k ||G_jk - T_jk||^2 / ||T_jk||^2 / J`` averaged over the batch.
    """

    def __init__(
        self,
        target: Tensor,
        masks: Tensor | None,
        kernels: Tensor,
        region_weights: Tensor | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        if (
            target.dim() != 4
            or (masks is not None and (masks.dim() != 3 or masks.shape[0] != target.shape[1]))
            or kernels.shape[0] != target.shape[0]
        ):
            raise ValueError(
                f"StyleLoss: target (J, K, C, C) {tuple(target.shape)} needs (K, H, W) masks "
                f"shared by the batch and (J, r, r) kernels, got masks "
                f"{None if masks is None else tuple(masks.shape)} and kernels "
                f"{tuple(kernels.shape)}"
            )
        if region_weights is None:
            if masks is None:
                raise ValueError("StyleLoss: without masks, give region_weights (K,)")
            region_weights = self.region_weights(mask_mass(masks))
        target, region_weights = target.detach(), region_weights.detach()  # constants
        # Relative error instead of Gatys' 1 / (4 C^2): the same weight means the same for every
        # layer, kernel and network. A target of norm 0 (nothing to match) drops out.
        norm = target.square().sum((-1, -2))
        scale = torch.where(
            norm > 0, region_weights[None].to(norm) / norm.clamp_min(1e-30), torch.zeros_like(norm)
        )
        self.register_buffer("target", target)
        self.register_buffer("masks", None if masks is None else masks.to(target.dtype))
        self.register_buffer("kernels", kernels.to(target.dtype))
        self.register_buffer("scale", scale / len(kernels))
        self.backend = backend

    def forward(self, features: Tensor) -> Tensor:
        if self.masks is None:
            raise ValueError("StyleLoss without masks takes Grams already formed: use of_gram")
        gram = masked_gram(
            features,
            self.masks.to(features.dtype),
            self.kernels.to(features.dtype),
            backend=self.backend,
        )
        return self.of_gram(gram)

    @staticmethod
    def region_weights(mass: Tensor) -> Tensor:
        """The default say of each region: its share of the mask mass ``(K,)``."""
        return mass / mass.sum().clamp_min(1e-30)

    def of_gram(self, gram: Tensor) -> Tensor:
        """The loss of Gram matrices ``(B, J, K, C, C)`` already taken (by tiles, say)."""
        if gram.shape[1:] != self.target.shape:  # else a broadcasting error, or a wrong loss
            raise ValueError(
                f"StyleLoss: Grams {tuple(gram.shape)} do not match the target "
                f"{tuple(self.target.shape)} (J, K, C, C): features of another layer?"
            )
        error = (gram - self.target).square().sum((-1, -2))  # (B, J, K)
        return (error * self.scale).sum((1, 2)).mean()


class ContentLoss(nn.Module):
    """``||F_b - P_b||^2 / ||P_b||^2`` against target features ``P (1 or B, C, H, W)``, the
    mean over the batch (a target of batch 1 serves every item).

    Relative, like ``StyleLoss``, instead of the paper's ``||F - P||^2 / 2``.
    """

    def __init__(self, target: Tensor):
        super().__init__()
        target = target.detach()  # a constant
        self.register_buffer("target", target)
        # each item's own norm (one for the whole batch divided the loss by the batch's size)
        self.register_buffer("scale", self.scale_of(target.square().flatten(1).sum(1)))

    @staticmethod
    def scale_of(square_sum: Tensor) -> Tensor:
        """``1 / ||P||^2`` from ``||P||^2``."""
        return 1 / square_sum.clamp_min(1e-30)

    def forward(self, features: Tensor) -> Tensor:
        error = (features - self.target).square().flatten(1).sum(1)
        return (error * self.scale).mean()


class TVLoss(nn.Module):
    """Total variation of images ``(B, 3, H, W)``: mean squared difference of neighbours."""

    def forward(self, image: Tensor) -> Tensor:
        return self.of_differences(image.diff(dim=-1), image.diff(dim=-2), image.shape)

    @staticmethod
    def of_differences(dx: Tensor, dy: Tensor, shape: Sequence[int]) -> Tensor:
        """The loss of images of ``shape`` from horizontal differences ``dx`` and vertical ones
        ``dy``: from all of them, the loss; from a tile's own, its share (the shares add up)."""
        *batch, H, W = shape
        n = math.prod(batch)
        # one row or column has no neighbours that way: a term of 0, not 0 / 0
        pairs_x, pairs_y = max(1, n * H * (W - 1)), max(1, n * (H - 1) * W)
        return dx.square().sum() / pairs_x + dy.square().sum() / pairs_y
