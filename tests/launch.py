"""Calling a backend's launchers directly, as ``cast.ops`` does: the derived quantities
``1 / n_k`` and ``(dG + dG^T) / n_k`` are formed by the op's entry and handed down."""

from __future__ import annotations

from cast.ops import canonical_inverse_mass
from cast.reference import symmetric_grad


def forward(launcher, features, masks, kernels, *args, **kwargs):
    """``launcher(features, masks, kernels, 1 / n_k, *args, **kwargs)``."""
    inv_mass = canonical_inverse_mass(features, masks, None)
    return launcher(features, masks, kernels, inv_mass, *args, **kwargs)


def backward(launcher, grad, features, masks, kernels, *args, **kwargs):
    """``launcher((dG + dG^T) / n_k, features, masks, kernels, *args, **kwargs)``."""
    inv_mass = canonical_inverse_mass(features, masks, None)
    sym_grad = symmetric_grad(grad.to(inv_mass.dtype), inv_mass).contiguous()
    return launcher(sym_grad, features, masks, kernels, *args, **kwargs)
