"""Calling a backend's launchers directly, as ``cast.ops`` does: ``1 / n_k`` is formed by
the op's entry and handed down, ``dG`` in the accumulation dtype."""

from __future__ import annotations

from cast.ops import canonical_inverse_mass


def forward(launcher, features, masks, kernels, *args, **kwargs):
    """``launcher(features, masks, kernels, 1 / n_k, *args, **kwargs)``."""
    inv_mass = canonical_inverse_mass(features, masks, None)
    return launcher(features, masks, kernels, inv_mass, *args, **kwargs)


def backward(launcher, grad, features, masks, kernels, *args, **kwargs):
    """``launcher(dG, features, masks, kernels, 1 / n_k, *args, **kwargs)``."""
    inv_mass = canonical_inverse_mass(features, masks, None)
    grad = grad.to(inv_mass.dtype).contiguous()
    return launcher(grad, features, masks, kernels, inv_mass, *args, **kwargs)
