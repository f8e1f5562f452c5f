"""``cast.masked_gram``: the op's single public entry (SPEC §1-3).

The public function checks its inputs once, puts them in canonical form and calls the
registered custom op ``torch.ops.cast.masked_gram``; its backward is the custom op
``torch.ops.cast.masked_gram_backward``, which ``masked_gram_grad`` calls alone (same checks)
where a loss is linear in ``G`` and the forward would be wasted. Both ops carry fake kernels,
so they trace under ``torch.compile(fullgraph=True)`` without graph breaks. The backends behind
them (see ``cast.backends``) never repeat these checks.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import backends
from .reference import gram_dtype, inverse


def masked_gram(
    features: Tensor,
    masks: Tensor | None = None,
    kernels: Tensor | None = None,
    *,
    mass: Tensor | float | None = None,
    backend: str | None = None,
    allow_tf32: bool = True,
) -> Tensor:
    """Masked, high-order Gram matrices of a feature map.

    Args:
        features: ``(B, C, H, W)`` feature maps ``F``; float16, bfloat16, float32 or float64.
        masks: soft region masks ``m_k`` with values in ``[0, 1]`` on the features' grid,
            ``(K, H, W)`` shared by the batch or ``(B, K, H, W)`` one set per batch item.
            ``None`` means one all-ones mask (``K = 1``).
        kernels: high-order kernels ``p_j``, ``(J, r, r)`` with ``r`` odd, applied to every
            channel as cross-correlation with zero padding (``conv2d``'s convention).
            ``None`` means the identity ``[[1.]]`` (``J = 1``): Gatys' Gram matrix.
        mass: the ``n_k`` to divide by instead of the masks' own, ``(K,)``, or ``(B, K)``
            with ``(B, K, H, W)`` masks, or one number for every mask; finite, non-negative.
            A tile of an image divides its sums by the whole image's mass, so the tiles'
            results add up to the image's (SPEC §5); ``1.0`` gives the sums ``Y^T Y``
            themselves. Zero mass gives zero, as an empty mask does. A number is checked on
            the host; a tensor's values are checked where they are, which on a GPU waits for
            the work queued before (a device synchronisation each call); under
            ``torch.compile``, by an assertion in the graph (``RuntimeError``).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default
            ``$CAST_BACKEND``, else the fastest one present for the device and dtype.
        allow_tf32: let the GPU backends use TF32 tensor cores for float32 input.

    Returns:
        ``G`` of shape ``(B, J, K, C, C)``: ``G[b, j, k] = Y^T Y / n_k`` with
        ``Y = M_k P_j F_b`` viewed as ``N x C`` (``N = H*W``) and ``n_k = sum_n m_k[n]^2``;
        zero where ``n_k == 0``. float64 for float64 features, float32 otherwise.
        Differentiable in ``features`` (closed-form backward, SPEC §1); ``masks`` and
        ``kernels`` are constants and get no gradient.
    """
    features, masks, kernels = canonical_inputs(features, masks, kernels)
    _refuse_transforms("cast.masked_gram", features, masks=masks, kernels=kernels, mass=mass)
    inv_mass = canonical_inverse_mass(features, masks, mass)
    chosen = _choose(backend, features, "cast.masked_gram")
    return torch.ops.cast.masked_gram(features, masks, kernels, inv_mass, chosen, allow_tf32)


def masked_gram_grad(
    features: Tensor,
    grad: Tensor,
    masks: Tensor | None = None,
    kernels: Tensor | None = None,
    *,
    mass: Tensor | float | None = None,
    backend: str | None = None,
    allow_tf32: bool = True,
) -> Tensor:
    """The gradient of ``(grad * masked_gram(features, masks, kernels, mass=mass)).sum()`` with
    respect to ``features``, from the op's backward alone: ``G`` is never computed. For a loss
    that is linear in ``G`` (a tile's share of an image's loss, SPEC §5) this is all autograd
    would use of the forward.

    Args:
        features, masks, kernels, mass, backend, allow_tf32: as for ``masked_gram``.
        grad: ``dL/dG``, ``(B, J, K, C, C)``.

    Returns:
        ``dF`` of ``features``' shape and dtype (SPEC §1's backward); not differentiable: a
        ``grad`` that requires grad, and torch.func transforms and forward-mode tangents of
        ``features`` or ``grad``, are refused. ``features`` may require grad (their graph is
        not followed): ``dF`` then goes on as ``features.backward(dF)``.
    """
    # constants here, all three: nothing differentiates through dF
    where = "cast.masked_gram_grad"
    inputs = canonical_inputs(features, masks, kernels, where)
    features, masks, kernels = (t.detach() for t in inputs)
    inv_mass = canonical_inverse_mass(features, masks, mass, where)
    B, C = features.shape[:2]
    expected = (B, kernels.shape[0], masks.shape[1], C, C)
    if not isinstance(grad, Tensor) or not grad.is_floating_point():
        raise TypeError(f"{where}: grad must be a floating-point tensor")
    if grad.shape != expected or grad.device != features.device:
        raise ValueError(
            f"{where}: grad must be {expected} (B, J, K, C, C) on "
            f"{features.device}, got {_describe(grad)}"
        )
    _refuse_transforms(where, inputs[0], grad, masks=inputs[1], kernels=inputs[2], mass=mass)
    if grad.requires_grad:  # else the gradient it asks for would be dropped, silently
        raise ValueError(f"{where}: dF is not differentiable, so grad gets no gradient; "
                         "pass grad.detach()")  # fmt: skip
    chosen = _choose(backend, features, where)
    return _d_features(grad.detach(), inv_mass, features, masks, kernels, chosen, allow_tf32)


def _refuse_transforms(where: str, *inputs: Tensor, **constants: object) -> None:
    """Derivatives the op cannot give, refused in one line instead of silently zero: in the
    ``inputs`` (``features``; ``grad`` for the backward), forward-mode AD and torch.func's
    differentiating transforms (the op has a backward only; ``vmap`` works, a loop over the
    op); in the ``constants`` (masks, kernels, mass), forward-mode tangents too (a gradient
    in them is refused where they require grad)."""
    if torch.compiler.is_compiling():
        return  # torch.compile's own rules apply there
    if any(_derivative_asked(t) for t in inputs):
        raise NotImplementedError(_NO_TRANSFORMS if where == "cast.masked_gram" else
                                  f"{where}: {_NO_GRAD_OF_GRAD}")  # fmt: skip
    for name, t in constants.items():
        if isinstance(t, Tensor) and _derivative_asked(t):
            raise ValueError(
                f"{where}: {name} (a constant of the problem) gets no derivative, and its "
                "tangent would be dropped; differentiate the plain PyTorch of cast.reference "
                "in it instead"
            )


def _derivative_asked(t: Tensor) -> bool:
    """Whether a torch.func transform differentiates ``t`` (a level that tracks its gradient:
    grad, jacrev) or a forward-mode tangent rides on it (jvp, jacfwd, forward_ad), at any level
    of torch.func's wrapping."""
    functorch = torch._C._functorch
    level = t
    while True:
        if not functorch.is_batchedtensor(level):  # vmap's: no tangent of its own to ask for
            differentiated = functorch.is_gradtrackingtensor(level) and level.requires_grad
            if differentiated or torch.autograd.forward_ad.unpack_dual(level).tangent is not None:
                return True
        if not functorch.is_functorch_wrapped_tensor(level):
            return False
        level = functorch.get_unwrapped(level)


_NO_TRANSFORMS = (
    "cast.masked_gram has a backward (loss.backward(), torch.autograd.grad) but no forward-mode "
    "AD and no torch.func transform other than vmap (grad, jacrev, jvp, jacfwd, hessian); "
    "use cast.reference.masked_gram_reference for those"
)
_NO_GRAD_OF_GRAD = (
    "dF is not differentiable (no torch.func transform other than vmap, no forward-mode AD); "
    "differentiate cast.reference.masked_gram_backward_reference for its derivatives"
)


def _choose(backend: str | None, features: Tensor, where: str) -> str:
    """The name of the backend that runs ``features``, or one line saying why none can."""
    try:
        return backends.choose_name(backend, features.device, features.dtype)
    except backends.BackendUnavailable as err:
        raise backends.BackendUnavailable(f"{where}: {err}") from None


def _d_features(grad, inv_mass, features, masks, kernels, backend: str, allow_tf32: bool):
    """``dF`` from ``dL/dG`` through the registered backward (``dG`` in the accumulation dtype,
    contiguous: no copy when it is so already)."""
    grad = grad.to(inv_mass.dtype).contiguous()
    return torch.ops.cast.masked_gram_backward(
        grad, features, masks, kernels, inv_mass, backend, allow_tf32
    )


# Mask values converted to float64 at a time when summing n_k without the compiled extension:
# 8 MiB of scratch.
MASS_BAND_VALUES = 1 << 20


def mass_band_rows(Bm: int, K: int, W: int) -> int:
    return max(1, MASS_BAND_VALUES // max(1, Bm * K * W))


def mass_scratch_bytes(Bm: int, K: int, H: int, W: int, device_type: str) -> int:
    """What ``inverse_mask_mass`` holds at once besides its result: the float64 band of
    ``mask_mass_in_bands`` where the compiled op has no kernel for the device, else nothing
    worth counting (8 bytes a mask and chunk of 8192 positions: 3 KiB at K = 3, 1024^2)."""
    if backends.compiled_op("_inverse_mask_mass", device_type):
        return 0
    return Bm * K * min(H, mass_band_rows(Bm, K, W)) * W * 8


def mask_mass_in_bands(masks: Tensor) -> Tensor:
    """``n_k = sum_n m_k[n]^2`` ``(Bm, K)`` summed in float64 a band of rows at a time: all
    the masks in float64 would be 2-4x their size (24 MiB at K = 3, 1024^2, float32), more
    than the kernels' own scratch. The fallback of ``inverse_mask_mass``: five ops a band."""
    Bm, K, H, W = masks.shape
    rows = mass_band_rows(Bm, K, W)
    mass = masks.new_zeros((Bm, K), dtype=torch.float64)
    for top in range(0, H, rows):
        band = masks[:, :, top : top + rows].to(torch.float64, copy=True)  # squared in place
        mass += band.square_().sum(dim=(2, 3))
    return mass


def inverse_mask_mass(masks: Tensor) -> Tensor:
    """``1 / n_k`` ``(Bm, K)`` of canonical masks in the accumulation dtype, ``n_k`` summed in
    float64 and 0 where it is 0: the compiled extension's one op (one read of the masks, no
    float64 copy, the same bits on CPU and GPU: csrc/mask_mass.h) where it has a kernel for
    the masks' device, else float64 bands (10 ops or more, each a kernel on a GPU)."""
    if backends.compiled_op("_inverse_mask_mass", masks.device.type):
        return torch.ops.cast._inverse_mask_mass(masks)
    return inverse(mask_mass_in_bands(masks)).to(gram_dtype(masks.dtype))


def canonical_inverse_mass(
    features: Tensor, masks: Tensor, mass: Tensor | float | None, where: str = "cast.masked_gram"
) -> Tensor:
    """``1 / n_k`` ``(Bm, K)`` in the accumulation dtype, formed once here for every backend:
    from the masks (summed in float64), or from ``mass`` where given (a number for every
    mask, or a tensor). Errors name the entry ``where``."""
    if mass is None:
        return inverse_mask_mass(masks)
    accumulation = gram_dtype(features.dtype)
    Bm, K = masks.shape[:2]
    if isinstance(mass, numbers.Real) and not isinstance(mass, bool):
        if not (math.isfinite(mass) and mass >= 0):
            raise ValueError(f"{where}: mass must be finite and >= 0, got {mass}")
        # as inverse() of the float64 tensor: 1 / n in float64, 0 for 0, then rounded
        value = 1.0 / float(mass) if mass > 0 else 0.0
        return torch.full((Bm, K), value, dtype=accumulation, device=features.device)
    if not isinstance(mass, Tensor) or not mass.is_floating_point():
        raise TypeError(f"{where}: mass must be a number, a floating-point tensor or None")
    if mass.device != features.device:
        raise ValueError(f"{where}: mass is on {mass.device} but features on {features.device}")
    if mass.shape not in ((K,), (Bm, K)):
        raise ValueError(
            f"{where}: mass must be (K,) or (Bm, K) with K = {K}, Bm = {Bm} (the masks' batch), "
            f"got {_describe(mass)}"
        )
    if mass.requires_grad:
        raise ValueError(f"{where}: mass is a constant of the problem; pass mass.detach()")
    # (K,): cheap, but reading the answer waits for the device (a number's check does not)
    valid = torch.isfinite(mass) & (mass >= 0)
    if torch.compiler.is_compiling():
        # a graph cannot read it on the host (fullgraph=True failed to trace): an assertion in
        # the graph instead, a RuntimeError (on a GPU a device-side assert)
        torch._assert_async(valid.all(), f"{where}: mass must be finite and >= 0")
    elif not bool(_every_value(valid).all()):
        values = _every_value(mass).tolist()
        raise ValueError(f"{where}: mass must be finite and >= 0, got {values}")
    return inverse(mass.to(torch.float64)).expand(Bm, K).to(accumulation).contiguous()


def _every_value(t: Tensor) -> Tensor:
    """``t`` with torch.func.vmap's batching undone: the values of every call at once, which
    can be read on the host (a batched tensor cannot: vmap over a mass failed on its check)."""
    functorch = torch._C._functorch
    while functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def canonical_inputs(
    features: Tensor, masks: Tensor | None, kernels: Tensor | None, where: str = "cast.masked_gram"
) -> tuple[Tensor, Tensor, Tensor]:
    """Check the op's inputs and return them contiguous, masks as ``(Bm, K, H, W)``.

    Raises ``TypeError`` for non-tensors and non-floating dtypes, ``ValueError`` for shapes,
    devices and dtype mismatches; each message names the entry ``where`` and what was expected.
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"{where}: features must be a tensor, got {type(features).__name__}")
    if features.dtype not in backends.FLOAT_DTYPES:
        raise TypeError(
            f"{where}: features must be float16, bfloat16, float32 or float64, "
            f"got {_describe(features)}"
        )
    if features.dim() != 4:
        raise ValueError(f"{where}: features must be (B, C, H, W), got {_describe(features)}")
    B, C, H, W = features.shape
    if min(B, C, H, W) == 0:
        raise ValueError(f"{where}: features must not be empty, got {_describe(features)}")

    if masks is None:
        masks = features.new_ones((1, 1, H, W))
    if kernels is None:
        kernels = features.new_ones((1, 1, 1))
    for name, t in (("masks", masks), ("kernels", kernels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {_describe(t)}")
        if t.device != features.device:
            raise ValueError(
                f"{where}: {name} are on {t.device} but features on {features.device}; "
                f"move them with .to(features.device)"
            )
        if t.dtype != features.dtype:
            raise ValueError(
                f"{where}: {name} are {str(t.dtype).removeprefix('torch.')} but features "
                f"{str(features.dtype).removeprefix('torch.')}; convert with .to(features.dtype)"
            )
        if t.requires_grad:  # else its .grad would stay None, silently
            raise ValueError(
                f"{where}: {name} are constants of the problem and get no gradient; "
                f"pass {name}.detach()"
            )

    if masks.dim() == 3:
        masks = masks[None]
    if masks.dim() != 4 or masks.shape[1] == 0:
        raise ValueError(
            f"{where}: masks must be (K, H, W) or (B, K, H, W) with K >= 1, got {_describe(masks)}"
        )
    if masks.shape[0] not in (1, B):
        raise ValueError(
            f"{where}: masks have batch {masks.shape[0]} but features have batch {B}; "
            f"give (K, H, W) masks to share them or (B, K, H, W) with B = {B}"
        )
    if masks.shape[-2:] != features.shape[-2:]:
        raise ValueError(
            f"{where}: masks are {tuple(masks.shape[-2:])} but features {(H, W)}; "
            "resample the masks to the features' grid first"
        )

    if kernels.dim() != 3 or kernels.shape[0] == 0:
        raise ValueError(
            f"{where}: kernels must be (J, r, r) with J >= 1, got {_describe(kernels)}"
        )
    if kernels.shape[1] != kernels.shape[2] or kernels.shape[1] % 2 == 0:
        raise ValueError(
            f"{where}: kernels must be square with an odd size r (1, 3, 5, ...), "
            f"got {_describe(kernels)}"
        )
    return features.contiguous(), masks.contiguous(), kernels.contiguous()


def check_canonical(
    features: Tensor, masks: Tensor, kernels: Tensor, inv_mass: Tensor, grad: Tensor | None = None
) -> None:
    """The contract between the registered ops and the backends, checked at the registered
    entry itself (``torch.ops.cast.masked_gram`` can be called directly): canonical shapes, one
    device, one floating dtype, contiguous; ``inv_mass`` ``(Bm, K)`` and, for the backward,
    ``grad`` ``(B, J, K, C, C)`` in the accumulation dtype. Cheap: metadata only, no pass over
    the data."""
    where = "torch.ops.cast.masked_gram" + ("" if grad is None else "_backward")
    tensors = {"features": features, "masks": masks, "kernels": kernels, "inv_mass": inv_mass}
    if grad is not None:
        tensors["grad"] = grad
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor")
        if t.device != features.device:
            raise ValueError(f"{where}: {name} on {t.device}, features on {features.device}")
        if not t.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous; use cast.masked_gram")
        # torch drops a custom op's forward-mode tangents, silently (torch.func.jvp's never
        # reach here: those are refused by cast.masked_gram alone, see README)
        if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{where} has no forward-mode AD ({name} has a tangent); differentiate the "
                "plain PyTorch of cast.reference instead"
            )
    for name, t in (("masks", masks), ("kernels", kernels)):
        if t.dtype != features.dtype:
            raise ValueError(f"{where}: {name} are {t.dtype}, features {features.dtype}")
    if features.dtype not in backends.FLOAT_DTYPES or features.dim() != 4 or not features.numel():
        raise ValueError(
            f"{where}: features must be non-empty (B, C, H, W), got {_describe(features)}"
        )
    B, C, H, W = features.shape
    if (
        masks.dim() != 4
        or masks.shape[0] not in (1, B)
        or masks.shape[1] == 0
        or masks.shape[2:] != (H, W)
    ):
        raise ValueError(
            f"{where}: masks must be (1 or {B}, K, {H}, {W}), got {_describe(masks)}; "
            "cast.masked_gram puts them in this form"
        )
    J = kernels.shape[0] if kernels.dim() == 3 else 0
    if J == 0 or kernels.shape[1] != kernels.shape[2] or kernels.shape[1] % 2 == 0:
        raise ValueError(f"{where}: kernels must be (J, r, r), r odd, got {_describe(kernels)}")
    K = masks.shape[1]
    expected = {"inv_mass": (masks.shape[0], K), "grad": (B, J, K, C, C)}
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is not None and (t.shape != shape or t.dtype != gram_dtype(features.dtype)):
            raise ValueError(
                f"{where}: {name} must be {shape} {gram_dtype(features.dtype)}, got {_describe(t)}"
            )


@torch.library.custom_op("cast::masked_gram", mutates_args=())
def _masked_gram_op(
    features: Tensor,
    masks: Tensor,
    kernels: Tensor,
    inv_mass: Tensor,
    backend: str,
    allow_tf32: bool,
) -> Tensor:
    check_canonical(features, masks, kernels, inv_mass)
    return backends.choose(backend, features.device, features.dtype).forward(
        features, masks, kernels, inv_mass, allow_tf32
    )


@_masked_gram_op.register_fake
def _(features, masks, kernels, inv_mass, backend, allow_tf32):
    B, C = features.shape[:2]
    shape = (B, kernels.shape[0], masks.shape[1], C, C)
    return features.new_empty(shape, dtype=gram_dtype(features.dtype))


@torch.library.custom_op("cast::masked_gram_backward", mutates_args=())
def _masked_gram_backward_op(
    grad: Tensor,
    features: Tensor,
    masks: Tensor,
    kernels: Tensor,
    inv_mass: Tensor,
    backend: str,
    allow_tf32: bool,
) -> Tensor:
    """``dF`` from ``dG`` ``(B, J, K, C, C)`` and ``1 / n_k`` ``(Bm, K)``. Each backend forms
    ``S = (dG + dG^T) / n_k`` as it needs it (Triton: a tile at a time, never all of it)."""
    check_canonical(features, masks, kernels, inv_mass, grad)
    return backends.choose(backend, features.device, features.dtype).backward(
        grad, features, masks, kernels, inv_mass, allow_tf32
    )


@_masked_gram_backward_op.register_fake
def _(grad, features, masks, kernels, inv_mass, backend, allow_tf32):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, masks, kernels, inv_mass, backend, allow_tf32 = inputs
    ctx.save_for_backward(features, masks, kernels, inv_mass)
    ctx.backend, ctx.allow_tf32 = backend, allow_tf32


def _backward(ctx, grad):
    features, masks, kernels, inv_mass = ctx.saved_tensors
    d_features = None
    if ctx.needs_input_grad[0]:
        d_features = _d_features(grad, inv_mass, features, masks, kernels, ctx.backend,
                                 ctx.allow_tf32)  # fmt: skip
    return d_features, None, None, None, None, None


_masked_gram_op.register_autograd(_backward, setup_context=_setup_context)
