"""``cast.stylize`` called from Python with bad tensors and numbers: a ``CastError`` before any
work, never an IndexError or RuntimeError from deep inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cast.errors import CastError, WeightsUnavailable
from cast.ops import canonical_inputs, inverse_mask_mass, masked_gram, masked_gram_grad
from cast.reference import masked_gram_backward_reference
from cast.stylize import _regions, stylize
from cast.weights import CAFFE, VGGWeights, conv_shapes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONTENT, STYLE = EXAMPLES / "tubingen.jpg", EXAMPLES / "starry_night.jpg"
# a weights file that is not there: reaching the network would fail with another message
NO_NETWORK = dict(model="missing-weights.pth", size=40, scales=1, iters=1, progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (torch.rand(3, 0, 64), r"content image tensor is empty: \(3, 0, 64\)"),
        (torch.rand(3, 48, 64) * 255, r"values in \[0, 1\], got .* scale 0-255 images by 1/255"),
        (torch.full((3, 48, 64), float("nan")), "content image tensor holds NaN"),
        (torch.rand(48, 64, 3), r"must be \(3, H, W\) floating RGB, got \(48, 64, 3\)"),
        (torch.randint(0, 2, (3, 48, 64)), r"floating RGB, got \(3, 48, 64\) int64"),
    ],
    ids=["empty", "0-255", "NaN", "channels last", "integer"],
)
def test_bad_image_tensors_are_refused_before_any_work(content, message):
    with pytest.raises(CastError, match=message):
        stylize(content, STYLE, **NO_NETWORK)


def test_a_bad_style_tensor_is_named_by_its_position():
    with pytest.raises(CastError, match="style image 2 tensor is empty"):
        stylize(CONTENT, [STYLE, torch.rand(3, 5, 0)], **NO_NETWORK)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.rand(0, 48, 64), r"content mask tensor must be \(K, H, W\) with K >= 1"),
        (torch.rand(2, 48, 48), "content mask tensor is 48x48 but its image is 64x48"),
        (torch.full((2, 48, 64), float("nan")), "content mask tensor holds NaN"),
        (torch.rand(2, 48, 64) * 255, r"values in \[0, 1\]"),
    ],
    ids=["no regions", "another aspect", "NaN", "0-255"],
)
def test_bad_content_mask_tensors(mask, message):
    with pytest.raises(CastError, match=message):
        _regions((48, 64), [(32, 32)], mask, None, None, strict=False)


def test_a_nan_style_mask_tensor_is_an_error_not_an_absent_region():
    style_mask = torch.ones(2, 32, 32)
    style_mask[1, 0, 0] = float("nan")
    with pytest.raises(CastError, match="style mask tensor holds NaN"):
        _regions((48, 64), [(32, 32)], torch.ones(2, 48, 64) / 2, [style_mask], None, strict=False)


def test_options_given_as_generators_work():
    styles = (s for s in [torch.rand(3, 32, 32), torch.rand(3, 40, 40)])
    masks = (m for m in [None, None])
    halves = torch.zeros(2, 32, 40)
    halves[0, :, :20] = 1
    halves[1] = 1 - halves[0]
    result = stylize(torch.rand(3, 32, 40), styles, content_mask=halves, style_masks=masks,
                     size=40, scales=1, iters=1, progress=False)  # fmt: skip
    assert result.shape == (3, 32, 40) and torch.isfinite(result).all()


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(size=40.5), "--size must be a whole number"),
        (dict(size=True), "--size must be a whole number"),
        (dict(iters=-1), "--iters must be 0 or more"),
        (dict(scales=10**9), "1000000000 scales at size 40"),
        (dict(size=10**400), "--size must be at most"),
        (dict(lr=0.0), "--lr must be positive"),
        (dict(style_weight="1"), "--style-weight must be a number"),
        (dict(seed=2**64), "--seed must be at most"),
        (dict(device="mps"), "device mps is not supported"),
        (dict(backend="fastest"), "unknown backend 'fastest'"),
        (dict(save_every=0, output="out.png"), "--save-every must be positive"),
        # were taken for true: spill="no" spilled, dry_run="no" only planned
        (dict(spill="no"), "spill must be True, False or None, got 'no'"),
        (dict(spill=1), "spill must be True, False or None, got 1"),
        (dict(dry_run="no"), "dry_run must be True or False, got 'no'"),
    ],
    ids=["fractional size", "bool size", "negative iters", "too many scales", "huge size",
         "zero lr", "string weight", "huge seed", "mps", "unknown backend", "save every 0",
         "string spill", "number spill", "string dry run"],
)  # fmt: skip
def test_bad_numbers_and_names_are_refused_before_any_work(given, message):
    with pytest.raises(CastError, match=message):
        stylize(CONTENT, STYLE, **(NO_NETWORK | given))


def test_weights_with_nan_are_refused():
    shapes = conv_shapes("vgg16")
    weights = [torch.zeros(shape) for shape in shapes]
    biases = [torch.zeros(shape[0]) for shape in shapes]
    biases[-1][3] = float("nan")
    with pytest.raises(WeightsUnavailable, match="hold NaN or infinite values"):
        VGGWeights("vgg16", tuple(weights), tuple(biases), CAFFE, "a test")


def test_masked_gram_is_differentiable_once_as_the_readme_says():
    features = torch.rand(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    gram = masked_gram(features, torch.rand(2, 6, 6, dtype=torch.float64))
    (grad,) = torch.autograd.grad(gram.square().sum(), features, create_graph=True)
    with pytest.raises(RuntimeError, match="masked_gram_backward.* no autograd formula"):
        grad.sum().backward()


def _dual_tangent(f, x):
    with torch.autograd.forward_ad.dual_level():
        out = f(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
        return torch.autograd.forward_ad.unpack_dual(out).tangent


@pytest.mark.parametrize(
    "transform",
    [
        lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),  # was silently zero
        lambda f, x: torch.func.jacfwd(f)(x),  # was silently zero
        _dual_tangent,  # was silently None
        lambda f, x: torch.func.grad(lambda x: f(x).sum())(x),
        lambda f, x: torch.func.vmap(torch.func.jacrev(lambda x: f(x[None])))(x),
        lambda f, x: torch.func.hessian(lambda x: f(x).sum())(x),
    ],
    ids=["jvp", "jacfwd", "forward_ad", "grad", "vmap-jacrev", "hessian"],
)
def test_torch_func_transforms_other_than_vmap_are_refused(transform):
    features, masks = torch.rand(2, 2, 4, 4, dtype=torch.float64), torch.rand(3, 4, 4).double()
    with pytest.raises(NotImplementedError, match="no forward-mode AD and no torch.func"):
        transform(lambda f: masked_gram(f, masks), features)


def test_vmap_and_transforms_of_other_inputs_work():
    features, masks = torch.rand(2, 2, 4, 4, dtype=torch.float64), torch.rand(3, 4, 4).double()
    gram = masked_gram(features, masks)
    assert torch.allclose(torch.func.vmap(lambda f: masked_gram(f[None], masks)[0])(features), gram)
    # the features are constants of this transform: d/dt of (G * t).sum() is G.sum()
    d_t = torch.func.grad(lambda t: (masked_gram(features * 1, masks) * t).sum())(
        torch.ones((), dtype=torch.float64)
    )
    assert torch.allclose(d_t, gram.sum())


def _jvp_tangent(f, x):
    return torch.func.jvp(f, (x,), (torch.ones_like(x),))[1]


@pytest.mark.parametrize("tangent", [_jvp_tangent, _dual_tangent], ids=["jvp", "forward_ad"])
@pytest.mark.parametrize("name", ["masks", "kernels", "mass"])
def test_a_tangent_of_a_constant_is_refused(tangent, name):
    """The masks, kernels and mass get no derivative: a forward-mode tangent of one was
    dropped, a tangent of G silently zero."""
    inputs = dict(
        features=torch.rand(1, 2, 4, 4, dtype=torch.float64),
        masks=torch.rand(2, 4, 4, dtype=torch.float64),
        kernels=torch.rand(1, 3, 3, dtype=torch.float64),
        mass=torch.full((2,), 3.0, dtype=torch.float64),
    )

    def gram(constant):
        return masked_gram(**(inputs | {name: constant}))

    with pytest.raises(ValueError, match=f"{name} .a constant of the problem. gets no deriv"):
        tangent(gram, inputs[name])


def test_the_registered_ops_called_directly_refuse_forward_ad():
    """torch drops a custom op's forward-mode tangents: G's was None, silently."""
    features, masks, kernels = canonical_inputs(torch.rand(1, 2, 4, 4), torch.rand(2, 4, 4), None)
    inv_mass, grad = inverse_mask_mass(masks), torch.rand(1, 1, 2, 2, 2)
    ops = torch.ops.cast
    with pytest.raises(NotImplementedError, match="masked_gram has no forward-mode AD"):
        _dual_tangent(lambda f: ops.masked_gram(f, masks, kernels, inv_mass, "cpu", True), features)
    with pytest.raises(NotImplementedError, match="backward has no forward-mode AD .grad has"):
        _dual_tangent(
            lambda g: ops.masked_gram_backward(g, features, masks, kernels, inv_mass, "cpu", True),
            grad,
        )  # fmt: skip


def test_masked_gram_grad_is_not_differentiable_and_says_so():
    """dF from the backward alone: a derivative of it was silently zero (torch.func.grad) or
    dropped (a dG that requires grad). Features that require grad are fine: dF goes on through
    their graph, as the tiled objective uses it."""
    features, masks = torch.rand(2, 3, 5, 4, dtype=torch.float64), torch.rand(2, 5, 4).double()
    grad = torch.rand(2, 1, 2, 3, 3, dtype=torch.float64)
    expected = masked_gram_backward_reference(grad, features, masks[None], torch.ones(1, 1, 1))
    leaf = features.clone().requires_grad_()
    assert torch.allclose(masked_gram_grad(leaf, grad, masks), expected, rtol=1e-10)
    vmapped = torch.func.vmap(lambda f, g: masked_gram_grad(f[None], g[None], masks)[0])
    assert torch.allclose(vmapped(features, grad), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="dF is not differentiable, so grad .*pass grad.detach"):
        masked_gram_grad(features, grad.clone().requires_grad_(), masks)
    for wrt in (0, 1):
        with pytest.raises(NotImplementedError, match="masked_gram_grad: dF is not differentiable"):
            torch.func.grad(lambda f, g: masked_gram_grad(f, g, masks).sum(), wrt)(features, grad)
        with pytest.raises(NotImplementedError, match="masked_gram_grad: dF is not differentiable"):
            torch.func.jvp(lambda f, g: masked_gram_grad(f, g, masks), (features, grad),
                           (features, grad))  # fmt: skip


def test_masks_that_do_not_go_together_are_refused_before_the_network(tmp_path):
    """From the arguments alone, before the weights load (NO_NETWORK's would fail otherwise),
    with what to do instead."""
    grey, labels = tmp_path / "sky.png", tmp_path / "labels.png"
    Image.fromarray(np.full((30, 40), 255, np.uint8)).save(grey)
    Image.fromarray(np.full((30, 40, 3), (255, 0, 0), np.uint8)).save(labels)
    with pytest.raises(CastError, match=r"need a content mask .* too \(--content-mask\)"):
        stylize(CONTENT, STYLE, style_masks=[labels], **NO_NETWORK)
    with pytest.raises(CastError, match="either a content label image or soft masks"):
        stylize(CONTENT, STYLE, content_mask=labels, soft_masks=[grey], **NO_NETWORK)
    with pytest.raises(CastError, match="soft masks cannot pair with style masks"):
        stylize(CONTENT, STYLE, style_masks=[labels], soft_masks=[grey], **NO_NETWORK)
