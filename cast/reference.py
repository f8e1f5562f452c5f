"""The op of SPEC §1 in plain PyTorch: the spec in code.

This module is the single definition every backend is measured against. It is also the
"obvious" eager implementation the benchmarks compare with: it materialises the convolved
and masked features, ``J*K*N*C`` values per call, which is exactly what the fused backends
avoid. Its forward is differentiable by autograd; ``masked_gram_backward_reference`` is the
closed-form gradient of SPEC §1 written out, so the formula itself is tested against autograd.

Shapes (already canonical, see ``cast.ops``): ``features (B, C, H, W)``, ``masks (Bm, K, H, W)``
with ``Bm`` in ``{1, B}``, ``kernels (J, r, r)`` with ``r`` odd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and output dtype of the op: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def convolve(features: Tensor, kernels: Tensor) -> Tensor:
    """Every channel cross-correlated with every kernel, zero padding: ``(B, J, C, H, W)``."""
    B, C, H, W = features.shape
    J, r, _ = kernels.shape
    out = F.conv2d(features, depthwise(kernels, C), padding=r // 2, groups=C)
    return out.reshape(B, C, J, H, W).transpose(1, 2)


def depthwise(kernels: Tensor, C: int) -> Tensor:
    """``(J, r, r)`` kernels as the weight of a grouped convolution, each of C channels with
    all J: ``(C * J, 1, r, r)``. Grouped, the convolution takes every channel at once (the
    benchmarks' eager baseline is this code): as a batch of C one-channel images, oneDNN pads
    each image's one channel to 16 on the CPU, 16x the memory and about 10x the time."""
    J, r, _ = kernels.shape
    return kernels[None].expand(C, J, r, r).reshape(C * J, 1, r, r)


def convolve_adjoint(grad: Tensor, kernels: Tensor) -> Tensor:
    """Adjoint of ``convolve`` summed over kernels: ``(B, J, C, H, W) -> (B, C, H, W)``."""
    B, J, C, H, W = grad.shape
    r = kernels.shape[-1]
    grad = grad.transpose(1, 2).reshape(B, C * J, H, W)
    return F.conv_transpose2d(grad, depthwise(kernels, C), padding=r // 2, groups=C)


def mask_mass(masks: Tensor) -> Tensor:
    """``n_k = sum_n m_k[n]^2`` of masks ``(..., K, H, W)``: ``(..., K)``, in the accumulation
    dtype (a float16 sum is inf from 65504 on: a 256 x 256 region)."""
    return masks.to(gram_dtype(masks.dtype)).flatten(-2).square().sum(-1)


def inverse_mass(masks: Tensor) -> Tensor:
    """``1 / n_k`` of masks ``(..., K, H, W)``, and 0 where a mask is empty: ``(..., K)``."""
    return inverse(mask_mass(masks))


def inverse(mass: Tensor) -> Tensor:
    """``1 / n`` where ``n > 0``, else 0 (an empty mask's statistics are 0, never NaN)."""
    return torch.where(mass > 0, mass.reciprocal(), torch.zeros_like(mass))


def symmetric_grad(grad: Tensor, inv_mass: Tensor) -> Tensor:
    """``S_jk = (dG_jk + dG_jk^T) / n_k``: ``(B, J, K, C, C)`` from ``dG`` and ``1 / n_k``
    ``(Bm, K)``. What every backward multiplies ``M_k^2 P_j F`` by; formed whole here and, the
    same way, in the CPU backend's glue (Triton a tile at a time; CUDA whole in a scratch where
    a tenth of inputs + outputs holds it, else a block at a time).
    Scaled in place: the sum is a new tensor, and a second one of dG's size would double the
    backward's largest scratch at deep layers (9 MiB at relu5_1, J = K = 3)."""
    return (grad + grad.transpose(-1, -2)).mul_(inv_mass[:, None, :, None, None])


def masked_gram_reference(
    features: Tensor, masks: Tensor, kernels: Tensor, inv_mass: Tensor | None = None
) -> Tensor:
    """``G[b, j, k] = (M_k P_j F_b)^T (M_k P_j F_b) / n_k``: ``(B, J, K, C, C)``.

    ``inv_mass`` ``(Bm, K)`` replaces ``1 / n_k`` where given (a tile's share of a whole
    image's statistics divides by the whole image's mass)."""
    acc = gram_dtype(features.dtype)
    f, m, p = features.to(acc), masks.to(acc), kernels.to(acc)
    inv_mass = inverse_mass(m) if inv_mass is None else inv_mass.to(acc)
    z = convolve(f, p).flatten(3)  # (B, J, C, N)
    y = z[:, :, None] * m.flatten(2)[:, None, :, None, :]  # (B, J, K, C, N)
    gram = y @ y.transpose(-1, -2)
    return gram * inv_mass[:, None, :, None, None]


def masked_gram_backward_reference(
    grad: Tensor, features: Tensor, masks: Tensor, kernels: Tensor, inv_mass: Tensor | None = None
) -> Tensor:
    """``dF_b = sum_jk P_j^T (M_k^2 (P_j F_b) (dG_bjk + dG_bjk^T)) / n_k``: ``(B, C, H, W)``."""
    acc = gram_dtype(features.dtype)
    f, m, p = features.to(acc), masks.to(acc), kernels.to(acc)
    inv_mass = inverse_mass(m) if inv_mass is None else inv_mass.to(acc)
    s = symmetric_grad(grad.to(acc), inv_mass)  # (B, J, K, C, C)
    B, C, H, W = f.shape
    z = convolve(f, p).flatten(3)  # (B, J, C, N)
    weighted = z[:, :, None] * m.flatten(2).square()[:, None, :, None, :]  # (B, J, K, C, N)
    dz = (s @ weighted).sum(2)  # (B, J, C, N); S is symmetric so no transpose is needed
    return convolve_adjoint(dz.reshape(B, -1, C, H, W), p).to(features.dtype)
