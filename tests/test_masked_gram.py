"""The op against its float64 reference, on every backend present (SPEC §1-3)."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
from functools import partial

import pytest
import torch
from cases import CASES, Case, relative_error

import cast
from cast import backends
from cast.reference import masked_gram_backward_reference, masked_gram_reference

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))  # host_path

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PRESENT = [
    (name, device)
    for name in backends.NAMES
    for device in DEVICES
    if backends.available(name) and device in backends.load(name).device_types
]
BACKEND_IDS = [f"{name}-{device}" for name, device in PRESENT]


CASE_IDS = [c.label for c in CASES]


GPU_BACKENDS = ("triton", "cuda")


def tolerance(dtype, name, allow_tf32=True):
    """SPEC §3's accuracy bounds. The GPU backends use TF32 for float32 when allowed, also
    the Triton kernels under the interpreter (their operands are rounded to TF32)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 3e-3 if name in GPU_BACKENDS and allow_tf32 else 1e-5
    return 2e-2


def dtypes_of(name, low_precision=False):
    """The backend's dtypes, most precise first; float16/bfloat16 only when asked for."""
    wanted = backends.FLOAT_DTYPES[::-1] if low_precision else (torch.float64, torch.float32)
    return [d for d in wanted if d in backends.load(name).dtypes]


def call(name, features, masks, kernels, **kw):
    return cast.masked_gram(features, masks, kernels, backend=name, **kw)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
def test_forward_and_backward_match_reference(name, device, case):
    for dtype in dtypes_of(name, low_precision=True):
        features, masks, kernels = case.inputs(dtype, device, seed=CASES.index(case))
        features.requires_grad_(True)
        gram = call(name, features, masks, kernels)

        f64, m64, p64 = case.inputs(torch.float64, "cpu", seed=CASES.index(case))
        m64 = torch.ones(1, 1, case.H, case.W, dtype=torch.float64) if m64 is None else m64
        m64 = m64 if m64.dim() == 4 else m64[None]
        expected = masked_gram_reference(f64, m64, p64)
        assert gram.shape == (case.B, case.J, case.K, case.C, case.C)
        assert gram.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.isfinite(gram).all()
        tol = tolerance(dtype, name)
        assert relative_error(gram, expected) <= tol, (dtype, relative_error(gram, expected))

        grad_out = torch.randn(gram.shape, generator=torch.Generator().manual_seed(1))
        (d_features,) = torch.autograd.grad(gram, features, grad_out.to(gram))
        expected_grad = masked_gram_backward_reference(grad_out.double(), f64, m64, p64)
        assert d_features.dtype == dtype
        assert torch.isfinite(d_features).all()
        err = relative_error(d_features, expected_grad)
        assert err <= tol, (dtype, err)
        # the backward alone, for a loss linear in G (a tile's share, SPEC §5)
        alone = cast.ops.masked_gram_grad(features, grad_out.to(gram), masks, kernels, backend=name)
        assert alone.dtype == dtype and relative_error(alone, expected_grad) <= tol, dtype

        if case.masks == "empty":
            assert (gram[:, :, -1] == 0).all()


@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
def test_plain_gatys_gram(name, device):
    """J = K = 1, identity kernel, all-ones mask: exactly F^T F / N."""
    dtype = dtypes_of(name)[0]
    features = torch.randn(2, 5, 7, 9, dtype=dtype, device=device)
    flat = features.double().flatten(2)
    expected = (flat @ flat.transpose(1, 2) / flat.shape[-1])[:, None, None]
    gram = call(name, features, None, None)
    assert relative_error(gram, expected) <= tolerance(dtype, name)


@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
def test_kernel_size_7(name, device):
    """r = 7, the widest kernel the tests reach (its backward stencil is 13 x 13), in full
    float32 (no TF32) so every backend is held to 1e-5."""
    if torch.float32 not in backends.load(name).dtypes:
        pytest.skip(f"{name} has no float32")
    case = Case("r=7", 1, 3, 9, 10, 1, 2, 7)
    features, masks, kernels = case.inputs(torch.float32, device, seed=7)
    features.requires_grad_(True)
    gram = call(name, features, masks, kernels, allow_tf32=False)
    f64, m64, p64 = case.inputs(torch.float64, "cpu", seed=7)
    m64 = m64[None]
    assert relative_error(gram, masked_gram_reference(f64, m64, p64)) <= 1e-5
    grad = torch.randn(gram.shape, generator=torch.Generator().manual_seed(8))
    (d_features,) = torch.autograd.grad(gram, features, grad.to(gram))
    expected = masked_gram_backward_reference(grad.double(), f64, m64, p64)
    assert relative_error(d_features, expected) <= 1e-5


@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
def test_gradcheck(name, device):
    if torch.float64 not in backends.load(name).dtypes:
        pytest.skip(f"{name} has no float64")
    case = Case("gradcheck", 2, 3, 5, 4, 2, 2, 3, "soft", True)
    features, masks, kernels = case.inputs(torch.float64, device, seed=3)
    features.requires_grad_(True)
    # fast_mode checks random projections of the Jacobian: the full one costs a minute under
    # Triton's interpreter; the reference comparison above already checks every entry.
    assert torch.autograd.gradcheck(
        lambda f: call(name, f, masks, kernels),
        (features,),
        eps=1e-6,
        atol=1e-7,
        fast_mode=(name == "triton" and backends.triton_interpreting()),
    )


@pytest.mark.parametrize("batched", [False, True], ids=["shared masks", "own masks"])
@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
def test_opcheck(name, device, batched):
    dtype = dtypes_of(name)[0]
    case = Case("opcheck", 2, 4, 5, 6, 2, 2, 3, "soft", batched)
    features, masks, kernels = case.inputs(dtype, device, seed=4)
    masks = masks if batched else masks[None]
    features.requires_grad_(True)
    inv_mass = cast.ops.canonical_inverse_mass(features, masks, None)
    torch.library.opcheck(
        torch.ops.cast.masked_gram.default, (features, masks, kernels, inv_mass, name, True)
    )
    grad = torch.randn(2, 2, 2, 4, 4, dtype=cast.reference.gram_dtype(dtype), device=device)
    torch.library.opcheck(
        torch.ops.cast.masked_gram_backward.default,
        (grad, features.detach(), masks, kernels, inv_mass, name, True),
    )


@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
def test_style_loss_under_torch_compile(name, device):
    """A loss built on the op traces without graph breaks and matches eager."""
    dtype = dtypes_of(name)[-1]
    features, masks, kernels = Case("compile", 1, 4, 6, 6, 2, 2, 3).inputs(dtype, device, seed=5)
    target = torch.randn(
        1, 2, 2, 4, 4, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device
    )

    def loss(f):
        return (call(name, f, masks, kernels) - target).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    x_eager = features.clone().requires_grad_(True)
    x_comp = features.clone().requires_grad_(True)
    eager_value, compiled_value = loss(x_eager), compiled(x_comp)
    eager_value.backward()
    compiled_value.backward()
    tol = tolerance(dtype, name)
    assert relative_error(compiled_value, eager_value) <= tol
    assert relative_error(x_comp.grad, x_eager.grad) <= tol


def test_a_first_call_inside_torch_compile_loads_its_backend(monkeypatch):
    """A program whose first call of the op is compiled: the backend is looked for (imports
    and all) outside the trace, so fullgraph=True holds and every size after the second
    shares one graph."""
    monkeypatch.setattr(backends, "_loaded", {})  # as in a fresh process
    torch._dynamo.utils.counters.clear()
    torch._dynamo.reset()
    kernels = cast.high_order_kernels("neighbours")
    compiled = torch.compile(
        lambda f, m: cast.masked_gram(f, m, kernels).square().sum(), fullgraph=True
    )
    for size in (6, 8, 10):
        features, masks = torch.rand(1, 2, size, size + 1), torch.rand(2, size, size + 1)
        value = compiled(features, masks)  # before any eager call
        expected = cast.masked_gram(features, masks, kernels).square().sum()
        assert relative_error(value, expected) <= 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_two_backends_first_looked_for_in_one_compiled_function(monkeypatch):
    """float32 and bfloat16 features in one fullgraph=True function, its first calls of the op:
    on CPU the second takes the reference backend, first looked for in the middle of the trace
    (which kept its first read of the cache of backends, so the lookup failed with a KeyError
    and fullgraph=True broke)."""
    monkeypatch.setattr(backends, "_loaded", {})  # as in a fresh process
    torch._dynamo.reset()
    masks = torch.rand(2, 6, 7)

    def grams(features):
        low = cast.masked_gram(features.bfloat16(), masks.bfloat16())
        return cast.masked_gram(features, masks), low

    features = torch.rand(1, 3, 6, 7)
    compiled = torch.compile(grams, fullgraph=True)(features)
    identity = torch.ones(1, 1, 1, dtype=torch.float64)
    for value, dtype in zip(compiled, (torch.float32, torch.bfloat16), strict=True):
        f, m = (t.to(dtype).double() for t in (features, masks[None]))  # as the op gets them
        assert relative_error(value, masked_gram_reference(f, m, identity)) <= 1e-5


def test_reference_backward_is_autograd_of_reference():
    """The closed-form gradient of SPEC §1 equals autograd of the forward definition."""
    features, masks, kernels = Case("formula", 2, 3, 6, 5, 3, 3, 5, "empty", True).inputs(
        torch.float64, "cpu", seed=6
    )
    features.requires_grad_(True)
    gram = masked_gram_reference(features, masks, kernels)
    grad_out = torch.randn_like(gram)
    (autograd,) = torch.autograd.grad(gram, features, grad_out)
    closed = masked_gram_backward_reference(grad_out, features.detach(), masks, kernels)
    assert relative_error(closed, autograd) <= 1e-12


def test_default_backend_and_environment_override(monkeypatch):
    features = torch.randn(1, 2, 4, 4)
    expected = "cpu" if backends.available("cpu") else "reference"
    assert backends.choose(None, features.device, features.dtype).name == expected
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.choose(None, features.device, features.dtype).name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="CAST_BACKEND='fastest' is not a backend"):
        cast.masked_gram(features)


def test_default_on_a_gpu_is_cuda_then_triton(monkeypatch):
    """The measured order (H100, a37e7bb: the CUDA kernels the faster summed over the VGG
    layers in every dtype): CUDA where its extension has the dtype, else Triton, else the
    reference. Which backends are present is set here, so no GPU is needed."""
    gpu = torch.device("cuda")

    def present(*names):
        for name in ("cuda", "triton"):
            found = backends.Backend(name, None, None, backends.FLOAT_DTYPES, ("cuda",))
            missing = backends.BackendUnavailable(f"no {name} here")
            monkeypatch.setitem(backends._loaded, name, found if name in names else missing)

    present("cuda", "triton")
    assert backends.default_for(gpu, torch.float32) == "cuda"
    present("triton")
    assert backends.default_for(gpu, torch.bfloat16) == "triton"
    present()
    assert backends.default_for(gpu, torch.float32) == "reference"


def test_low_precision_on_cpu_falls_back_to_reference():
    features = torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)
    assert backends.choose(None, features.device, features.dtype).name == "reference"
    gram = cast.masked_gram(features)
    assert gram.dtype == torch.float32
    expected = masked_gram_reference(
        features.double(), torch.ones(1, 1, 5, 5).double(), torch.ones(1, 1, 1).double()
    )
    assert relative_error(gram, expected) <= 2e-2


F = torch.randn(2, 3, 6, 5)
M = torch.rand(2, 6, 5)
P = torch.randn(2, 3, 3)
BAD_INPUTS = [
    ("features not a tensor", dict(features=F.numpy()), TypeError, "features must be a tensor"),
    ("integer features", dict(features=F.long()), TypeError, "features must be float16"),
    ("features 3-D", dict(features=F[0]), ValueError, r"features must be \(B, C, H, W\)"),
    ("empty features", dict(features=F[:, :0]), ValueError, "must not be empty"),
    ("masks other grid", dict(masks=M[:, :5]), ValueError, "resample the masks"),
    ("masks rank 2", dict(masks=M[0]), ValueError, r"masks must be \(K, H, W\)"),
    ("masks rank 5", dict(masks=M[None, None]), ValueError, r"masks must be \(K, H, W\)"),
    ("masks wrong batch", dict(masks=M.expand(3, 2, 6, 5)), ValueError, "masks have batch 3"),
    ("no regions", dict(masks=M[:0]), ValueError, "K >= 1"),
    ("integer masks", dict(masks=(M > 0.5).int()), TypeError, "masks must be floating"),
    ("masks float64", dict(masks=M.double()), ValueError, "convert with"),
    ("even kernel", dict(kernels=torch.randn(1, 2, 2)), ValueError, "odd size"),
    ("non-square kernel", dict(kernels=torch.randn(1, 3, 5)), ValueError, "square"),
    ("kernels 2-D", dict(kernels=torch.randn(3, 3)), ValueError, r"kernels must be \(J, r, r\)"),
    ("kernels float16", dict(kernels=P.half()), ValueError, "kernels are float16"),
    ("masks on meta", dict(masks=M.to("meta")), ValueError, "move them with"),
    ("masks need grad", dict(masks=M.clone().requires_grad_()), ValueError, "pass masks.detach"),
    ("kernels need grad", dict(kernels=P.clone().requires_grad_()), ValueError, "no gradient"),
    ("all on meta", dict(features=F.to("meta"), masks=M.to("meta"), kernels=P.to("meta")),
     RuntimeError, "tensors, got meta"),  # fmt: skip
    ("unknown backend", dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
    ("cuda backend on cpu", dict(backend="cuda"), RuntimeError, "backend 'cuda'"),
]


@pytest.mark.parametrize(
    "args,error,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_refused_with_a_clear_message(args, error, message):
    call_args = dict(features=F, masks=M, kernels=P) | args
    with pytest.raises(error, match=message):
        cast.masked_gram(**call_args)


def test_import_without_extension_or_triton_falls_back_and_says_what_is_missing():
    """`import cast` needs neither the compiled extension nor Triton (STYLE practice 7)."""
    code = (
        "import sys; sys.modules['cast._C'] = None; sys.modules['triton'] = None\n"
        "import torch, cast\n"
        "gram = cast.masked_gram(torch.randn(1, 2, 4, 4))\n"
        "assert gram.shape == (1, 1, 1, 2, 2)\n"
        "for name in ('cpu', 'triton'):\n"
        "    try:\n"
        "        cast.masked_gram(torch.randn(1, 2, 4, 4), backend=name)\n"
        "    except cast.BackendUnavailable as err:\n"
        "        print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert len(out) == 2
    assert "needs CAST's compiled extension" in out[0] and "pip install" in out[0]
    assert "needs a recent Triton" in out[1]


def _registered_entries(device):
    """Every registered op a user can call directly on ``device``: the public custom op with
    each backend present, and the compiled extension's own ops."""
    entries = [
        (f"cast::masked_gram[{name}]", partial(torch.ops.cast.masked_gram, backend=name))
        for name, where in PRESENT
        if where == device
    ]
    if backends.available("cpu" if device == "cpu" else "cuda"):
        entries.append(("cast::_masked_gram_fused", torch.ops.cast._masked_gram_fused))
    return entries


def _call_entry(entry, features, masks, kernels):
    """The entry with ``1 / n_k`` as cast.ops forms it where the masks allow, else ones."""
    try:
        inv_mass = cast.ops.canonical_inverse_mass(features, masks, None)
    except (RuntimeError, ValueError, TypeError):
        inv_mass = torch.ones(masks.shape[:2] if masks.dim() > 1 else (1, 1))
    if isinstance(entry, partial):  # the public op takes the backend before allow_tf32
        return entry.func(features, masks, kernels, inv_mass, entry.keywords["backend"], False)
    return entry(features, masks, kernels, inv_mass, False)


M4 = M[None]
REGISTERED_BAD_INPUTS = [
    ("masks other grid", dict(masks=M4[..., :4].contiguous())),
    ("masks wider grid", dict(masks=torch.rand(1, 2, 6, 9))),
    ("masks 3-D", dict(masks=M)),
    ("masks wrong batch", dict(masks=torch.rand(3, 2, 6, 5))),
    ("no regions", dict(masks=M4[:, :0])),
    ("masks float64", dict(masks=M4.double())),
    ("masks not contiguous", dict(masks=torch.rand(1, 2, 5, 6).transpose(-1, -2))),
    ("features not contiguous", dict(features=torch.randn(2, 3, 5, 6).transpose(-1, -2))),
    ("features 3-D", dict(features=F[0])),
    ("empty features", dict(features=F[:, :0])),
    ("integer features", dict(features=F.long())),
    ("even kernel", dict(kernels=torch.randn(1, 2, 2))),
    ("non-square kernel", dict(kernels=torch.randn(1, 3, 5))),
    ("kernels 2-D", dict(kernels=torch.randn(3, 3))),
    ("no kernels", dict(kernels=torch.randn(0, 3, 3))),
]


@pytest.mark.parametrize("device", sorted({d for _, d in PRESENT}))
@pytest.mark.parametrize(
    "args", [b[1] for b in REGISTERED_BAD_INPUTS], ids=[b[0] for b in REGISTERED_BAD_INPUTS]
)
def test_registered_ops_refuse_bad_input_before_reading_memory(device, args):
    """``torch.ops.cast.*`` are reachable without ``cast.masked_gram``'s checks: each entry
    checks the contract itself (an out-of-grid mask once read past its end on the CPU)."""
    inputs = dict(features=F, masks=M4, kernels=P) | args
    inputs = {k: v.to(device) for k, v in inputs.items()}
    for label, entry in _registered_entries(device):
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            _call_entry(entry, **inputs)
            pytest.fail(f"{label} accepted {args}")


@pytest.mark.parametrize("device", sorted({d for _, d in PRESENT}))
def test_registered_ops_fuzzed_error_or_right_answer(device):
    """Random shapes, strides and dtypes straight into every registered entry: a clean error
    or the reference's answer, never a result read from the wrong memory."""
    gen = torch.Generator().manual_seed(12)

    def pick(*options):
        return options[torch.randint(len(options), (1,), generator=gen).item()]

    answered = 0
    for _ in range(40):
        B, C, H, W = (torch.randint(1, 5, (1,), generator=gen).item() for _ in range(4))
        K, J = pick(1, 2), pick(1, 2)
        dtype = pick(torch.float32, torch.float64, torch.float16)
        features = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        masks = torch.rand(pick(1, B, B + 1), K, pick(H, H + 1), pick(W, W - 1 or 1), generator=gen)
        kernels = torch.randn(J, pick(1, 3), pick(1, 3, 2), generator=gen)
        if pick(False, True):
            features = features.transpose(-1, -2).contiguous().transpose(-1, -2)
        features, masks, kernels = (
            t.to(device, dtype if i == 0 else pick(dtype, torch.float32))
            for i, t in enumerate((features, masks, kernels))
        )
        for label, entry in _registered_entries(device):
            try:
                gram = _call_entry(entry, features, masks, kernels)
            except (RuntimeError, ValueError, TypeError):
                continue
            expected = masked_gram_reference(features.double(), masks.double(), kernels.double())
            assert relative_error(gram, expected) <= 2e-2, label
            answered += 1
    assert answered > 0  # the fuzzing also reaches valid inputs


G_SHAPE = (2, 2, 2, 3, 3)  # (B, J, K, C, C) of F, M, P
REGISTERED_BAD_BACKWARD = [
    ("grad wrong K", dict(grad=torch.randn(2, 2, 3, 3, 3))),
    ("grad float64", dict(grad=torch.randn(G_SHAPE, dtype=torch.float64))),
    ("grad not contiguous", dict(grad=torch.randn(G_SHAPE).transpose(-1, -2))),
    ("inv_mass wrong K", dict(inv_mass=torch.ones(1, 3))),
    ("inv_mass (K,)", dict(inv_mass=torch.ones(2))),
]


@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
@pytest.mark.parametrize(
    "args", [b[1] for b in REGISTERED_BAD_BACKWARD], ids=[b[0] for b in REGISTERED_BAD_BACKWARD]
)
def test_registered_backward_refuses_bad_grad_or_mass(name, device, args):
    """The registered backward takes dG and 1 / n_k and checks both itself (a backend reads
    dG's mirrored elements, so a wrong C or stride would read elsewhere)."""
    if torch.float32 not in backends.load(name).dtypes:
        pytest.skip(f"{name} has no float32")
    inputs = dict(grad=torch.randn(G_SHAPE), inv_mass=torch.ones(1, 2)) | args
    with pytest.raises(ValueError, match="masked_gram_backward: (grad|inv_mass) must be"):
        torch.ops.cast.masked_gram_backward(
            inputs["grad"].to(device), F.to(device), M4.to(device), P.to(device),
            inputs["inv_mass"].to(device), name, False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "mass,message",
    [
        (torch.ones(3), r"mass must be \(K,\)"),
        (torch.tensor([1.0, -1.0]), "finite and >= 0"),
        (torch.tensor([1.0, float("nan")]), "finite and >= 0"),
        (torch.tensor([1.0, float("inf")]), "finite and >= 0"),
        (torch.ones(2, dtype=torch.int64), "floating-point"),
        (-1.0, "finite and >= 0"),
        (float("nan"), "finite and >= 0"),
        (float("inf"), "finite and >= 0"),
        (True, "a number, a floating-point tensor"),
        ("1", "a number, a floating-point tensor"),
    ],
    ids=["wrong K", "negative", "NaN", "inf", "integer", "negative number", "NaN number",
         "inf number", "bool", "string"],
)
def test_bad_mass_is_refused(mass, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cast.masked_gram(F, M, P, mass=mass)


@pytest.mark.parametrize(
    "grad,message",
    [
        (torch.ones(2, 2, 3, 3, 3), r"grad must be \(2, 2, 2, 3, 3\)"),
        (torch.ones(2, 2, 3, 3), r"grad must be \(2, 2, 2, 3, 3\)"),
        (torch.ones(2, 2, 2, 3, 3, dtype=torch.int64), "floating-point"),
    ],
    ids=["wrong K", "no batch", "integer"],
)
def test_bad_grad_is_refused(grad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cast.ops.masked_gram_grad(F, grad, M, P)


def test_masked_gram_grad_names_itself_in_the_op_checks_it_shares():
    with pytest.raises(ValueError, match="^cast.masked_gram_grad: masks have batch 3"):
        cast.ops.masked_gram_grad(F, torch.ones(G_SHAPE), M.expand(3, 2, 6, 5), P)
    with pytest.raises(ValueError, match="^cast.masked_gram_grad: mass must be finite"):
        cast.ops.masked_gram_grad(F, torch.ones(G_SHAPE), M, P, mass=-1.0)


def test_mass_divides_instead_of_the_masks_own():
    """``mass=`` replaces ``n_k``: unit mass gives the sums, and the sums over the two halves of
    an image, each divided by the whole image's mass, add up to the whole image's Gram."""
    features, masks, kernels = F.double(), M.double(), P.double()
    whole = cast.masked_gram(features, masks, kernels)
    mass = masks.flatten(1).square().sum(1)
    sums = cast.masked_gram(features, masks, kernels, mass=torch.ones_like(mass))
    assert torch.allclose(sums, whole * mass[:, None, None], rtol=1e-12)
    top = masks.clone()
    top[:, 3:] = 0
    halves = [cast.masked_gram(features, m, kernels, mass=mass) for m in (top, masks - top)]
    assert torch.allclose(halves[0] + halves[1], whole, rtol=1e-12)


def test_a_mass_tensor_traces_under_torch_compile_with_its_check():
    """fullgraph=True failed to trace the check of a tensor mass (a read on the host): in a
    graph the check is an assertion, the Grams and their gradient those of eager."""
    torch._dynamo.reset()
    features, masks, kernels = F.double(), M.double(), P.double()

    def loss(f, mass):
        return cast.masked_gram(f, masks, kernels, mass=mass).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    mass = torch.tensor([2.0, 5.0], dtype=torch.float64)
    x = features.clone().requires_grad_()
    value = compiled(x, mass)
    value.backward()
    y = features.clone().requires_grad_()
    expected = masked_gram_reference(y, masks[None], kernels, 1 / mass[None]).square().sum()
    expected.backward()
    assert relative_error(value, expected) <= 1e-10
    assert relative_error(x.grad, y.grad) <= 1e-10
    with pytest.raises(RuntimeError, match="cast.masked_gram: mass must be finite and >= 0"):
        compiled(features, -mass)


def test_vmap_over_a_mass_tensor():
    """vmap over the mass: its check read a batched tensor on the host and failed ("data-
    dependent control flow"); it reads every call's values at once."""
    features, masks, kernels = F.double(), M.double(), P.double()
    masses = torch.tensor([[2.0, 5.0], [0.5, 0.0], [1.0, 3.0]], dtype=torch.float64)
    grams = torch.func.vmap(lambda mass: cast.masked_gram(features, masks, kernels, mass=mass))
    for gram, mass in zip(grams(masses), masses, strict=True):
        inverse = torch.where(mass > 0, 1 / mass, 0)[None]
        expected = masked_gram_reference(features, masks[None], kernels, inverse)
        assert relative_error(gram, expected) <= 1e-10
    masses[1, 0] = -1
    with pytest.raises(ValueError, match=r"mass must be finite and >= 0, got .*-1\.0"):
        grams(masses)


@pytest.mark.parametrize("number", [1.0, 3, 2.5, 0.0])
def test_a_number_as_mass_is_that_mass_for_every_mask(number):
    """``mass=x`` gives what ``mass`` = x for each mask gives, bit for bit (0: zero, as an empty
    mask), forward and the gradient pass alike."""
    for features, masks in ((F, M), (F.double(), M.double()), (F[:1], M[None])):
        kernels = P.to(features.dtype)
        per_mask = torch.full(masks.shape[-3:-2], float(number), dtype=features.dtype)
        assert torch.equal(cast.masked_gram(features, masks, kernels, mass=number),
                           cast.masked_gram(features, masks, kernels, mass=per_mask))  # fmt: skip
        dtype = cast.reference.gram_dtype(features.dtype)
        grad = torch.randn(features.shape[0], 2, 2, 3, 3, dtype=dtype)
        assert torch.equal(
            cast.ops.masked_gram_grad(features, grad, masks, kernels, mass=number),
            cast.ops.masked_gram_grad(features, grad, masks, kernels, mass=per_mask),
        )


def test_the_masks_mass_or_a_number_reads_no_tensor_on_the_host(monkeypatch):
    """What makes ``mass=1.0`` (``cast.losses.gram_sums``, every step of a stylisation) and
    the default ``mass=None`` cheap on a GPU: no tensor's value is read back to decide
    anything, so the host never waits for the device. A tensor mass is read (its check),
    which this test would catch."""

    def refuse(*_):
        raise AssertionError("a tensor's value was read on the host")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for mass in (1.0, None):
        cast.masked_gram(F, M, P, mass=mass)
        cast.ops.masked_gram_grad(F, torch.ones(2, 2, 2, 3, 3), M, P, mass=mass)
    with pytest.raises(AssertionError, match="read on the host"):
        cast.masked_gram(F, M, P, mass=torch.ones(2))


def test_mask_mass_in_bands_is_the_float64_sum(monkeypatch):
    monkeypatch.setattr(cast.ops, "MASS_BAND_VALUES", 100)  # bands of 1-2 rows
    for dtype in (torch.float32, torch.float64):  # float64: a band is a copy, not a view
        masks = torch.rand(2, 3, 37, 11, generator=torch.Generator().manual_seed(3)).to(dtype)
        given = masks.clone()
        exact = masks.double().square().sum(dim=(2, 3))
        banded = cast.ops.mask_mass_in_bands(masks)
        torch.testing.assert_close(banded, exact, rtol=1e-15, atol=0)
        assert torch.equal(masks, given)


needs_mass_op = pytest.mark.skipif(
    not backends.compiled_op("_inverse_mask_mass", "cpu"), reason="no compiled extension"
)
# (Bm, K, H, W) of canonical masks, by why they are there
MASS_SHAPES = {
    "minimal": (1, 1, 1, 1),
    "odd, shared by the batch": (1, 3, 37, 11),
    "own masks per batch item": (2, 3, 5, 7),
    "chunks of 8192 and a part": (2, 2, 97, 101),
    "more chunks than lanes": (1, 1, 1500, 1400),  # 257 chunks: lanes take two
}


def float64_mass(masks):
    """n_k ``(Bm, K)``: the squares in float64 (exact below float64), summed exactly and
    rounded once (math.fsum)."""
    squares = masks.double().square().flatten(2)
    return torch.tensor([[math.fsum(row.tolist()) for row in batch] for batch in squares],
                        dtype=torch.float64)  # fmt: skip


@needs_mass_op
@pytest.mark.parametrize("dtype", backends.FLOAT_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", MASS_SHAPES.values(), ids=MASS_SHAPES.keys())
def test_inverse_mask_mass_is_the_float64_sum(monkeypatch, dtype, shape):
    """The compiled op's 1 / n_k: n_k the float64 sum to float64 rounding, then 1 / n_k
    rounded to the accumulation dtype, as cast.reference.inverse gives it (for 16- and 32-bit
    masks the same bits), 0 for an empty mask; the float64 bands, the fallback without the
    extension, agree."""
    gen = torch.Generator().manual_seed(sum(shape))
    masks = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    if shape[1] > 1:
        masks[:, -1] = 0
    expected = cast.reference.inverse(float64_mass(masks)).to(cast.reference.gram_dtype(dtype))
    found = cast.ops.inverse_mask_mass(masks)
    monkeypatch.setattr(backends, "compiled_op", lambda op, device_type: False)
    banded = cast.ops.inverse_mask_mass(masks)
    for inverse in (found, banded):
        assert inverse.dtype == expected.dtype and inverse.shape == shape[:2]
        if dtype == torch.float64:
            torch.testing.assert_close(inverse, expected, rtol=1e-15, atol=0)
        else:
            assert torch.equal(inverse, expected)
    if shape[1] > 1:
        assert (found[:, -1] == 0).all()


def float64_mass_in_fixed_order(masks):
    """n_k ``(Bm, K)`` summed in csrc/mask_mass.h's order: chunks of 8192 positions, in which
    lane t of 256 adds the squares at t, t + 256, ... from 0, then the lanes pairwise (lane
    t + h into lane t, h = 128, ..., 1); then each mask's chunk sums the same way. Zeros pad
    the last chunk and the chunks to whole rows of lanes: +0 added to a sum changes no bit."""

    def rows(values, width):  # (P, n) -> (P, n / width rounded up, width)
        padded = torch.nn.functional.pad(values, (0, -values.shape[1] % width))
        return padded.unflatten(1, (-1, width))

    def lane_sum(values):  # (P, n) -> (P,)
        lanes = torch.zeros(values.shape[0], 256, dtype=torch.float64)
        for row in rows(values, 256).unbind(1):
            lanes = lanes + row
        while lanes.shape[1] > 1:
            half = lanes.shape[1] // 2
            lanes = lanes[:, :half] + lanes[:, half:]
        return lanes[:, 0]

    chunks = rows(masks.double().square().flatten(2).flatten(0, 1), 8192)
    chunk_sums = lane_sum(chunks.flatten(0, 1)).view(chunks.shape[:2])
    return lane_sum(chunk_sums).view(masks.shape[:2])


@needs_mass_op
@pytest.mark.parametrize(
    "shape", [(2, 16, 97, 101), (1, 4, 1500, 1400)], ids=["lanes of a chunk", "lanes of chunks"]
)
def test_inverse_mask_mass_sums_in_one_order(shape):
    """The compiled op's n_k is mask_mass.h's order to the last bit (the CUDA kernels are held
    to its bits: tests/test_cuda_sources.py, tests/test_gpu.py). float64 masks, whose squares
    round: another order changes some of these masks' bits, which the float64 sum's 1e-15
    above lets through (lanes added in adjacent pairs, or a lane's values taken contiguously);
    257 chunks, more than the lanes, for the chunks' order."""
    masks = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = cast.reference.inverse(float64_mass_in_fixed_order(masks))
    assert torch.equal(torch.ops.cast._inverse_mask_mass(masks), expected)


@needs_mass_op
def test_inverse_mask_mass_refuses_what_is_not_masks():
    for masks in (torch.rand(2, 5, 5), torch.rand(1, 0, 5, 5), torch.rand(1, 2, 0, 5),
                  torch.ones(1, 2, 5, 5, dtype=torch.int64)):  # fmt: skip
        with pytest.raises(RuntimeError, match="_inverse_mask_mass: masks must be"):
            torch.ops.cast._inverse_mask_mass(masks)


@needs_mass_op
@pytest.mark.parametrize("device", sorted({d for _, d in PRESENT}))
def test_inverse_mask_mass_opcheck(device):
    """The n_k op's registration: schema, a fake kernel that takes symbolic sizes (torch.compile
    with a dynamic batch), no autograd; its values are the test above's."""
    for dtype in (torch.float32, torch.float64):
        masks = torch.rand(2, 3, 5, 7, device=device, dtype=dtype)
        torch.library.opcheck(torch.ops.cast._inverse_mask_mass.default, (masks,))


@needs_mass_op
def test_inverse_mask_mass_is_a_constant():
    """No gradient flows to the masks (SPEC §1): 1 / n_k never requires grad, so autograd
    never meets the op (it would warn that it has no backward)."""
    masks = torch.rand(1, 2, 5, 5, requires_grad=True)
    assert not torch.ops.cast._inverse_mask_mass(masks).requires_grad


@needs_mass_op
@pytest.mark.parametrize("name,device", PRESENT, ids=BACKEND_IDS)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no grad", "grad"])
def test_one_op_for_the_masks_mass(name, device, requires_grad):
    """Before its custom op a forward with ``mass=None`` runs one ATen op, whatever the
    backend: the compiled 1 / n_k (were 10, 22 at relu1_1 of a 1024^2 image, each a kernel on a
    GPU: gpu-notes, "The op's host path"). Counted as bench/host_path.py counts them."""
    from host_path import CountOps

    # on the device before counting: a copy there is the test's, not the op's
    masks, kernels = M.to(device), P.to(device)
    features = F.to(device).requires_grad_(requires_grad)
    with CountOps() as counted:
        call(name, features, masks, kernels)
    assert counted.ops == {"_inverse_mask_mass": 1, "masked_gram": 1}
