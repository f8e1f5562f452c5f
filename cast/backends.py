"""Where each backend of the op lives, and which one a call gets.

Every backend implements the same two functions on canonical, already validated inputs
(``cast.ops`` checks them once and forms the derived quantities once):
``forward(features, masks, kernels, inv_mass, allow_tf32) -> G`` with ``inv_mass = 1 / n_k``
``(Bm, K)``, and ``backward(grad, features, masks, kernels, inv_mass, allow_tf32) -> dF`` with
``grad = dG`` ``(B, J, K, C, C)``, both in the accumulation dtype; each backward forms
``S = (dG + dG^T) / n_k`` where it needs it.
Nothing here repeats the op's checks; it only knows what each backend needs (device, dtypes,
a compiled extension, Triton) and says clearly what is missing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference

ENV_VAR = "CAST_BACKEND"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailable(RuntimeError):
    """A backend was asked for that this installation or this input cannot use."""


class Backend(NamedTuple):
    name: str
    forward: Callable[[Tensor, Tensor, Tensor, Tensor, bool], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, bool], Tensor]
    dtypes: tuple[torch.dtype, ...]
    device_types: tuple[str, ...]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _reference() -> Backend:
    return Backend(
        "reference",
        lambda f, m, p, inv_mass, tf32: reference.masked_gram_reference(f, m, p, inv_mass),
        lambda g, f, m, p, inv_mass, tf32: reference.masked_gram_backward_reference(
            g, f, m, p, inv_mass
        ),
        FLOAT_DTYPES,
        ("cpu", "cuda"),
    )


# Whether the compiled extension has a kernel for an op on a device type, asked once per pair.
_compiled_ops: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result  # torch.compile takes the answer, not the import
def compiled_op(op: str, device_type: str) -> bool:
    """Whether the compiled extension is built and has a ``device_type`` kernel for
    ``cast::op`` (a dictionary lookup a call after the first)."""
    key = (op, device_type)
    if key not in _compiled_ops:
        try:
            importlib.import_module("cast._C")
        except ImportError:
            _compiled_ops[key] = False
        else:
            # the dispatch keys the extension registers kernels for; any other device has none
            dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
            has = torch._C._dispatch_has_kernel_for_dispatch_key
            _compiled_ops[key] = dispatch_key is not None and has(f"cast::{op}", dispatch_key)
    return _compiled_ops[key]


def _compiled(name: str, device_type: str, dtypes: tuple[torch.dtype, ...]) -> Backend:
    try:
        importlib.import_module("cast._C")
    except ImportError as err:
        raise BackendUnavailable(
            f"backend {name!r} needs CAST's compiled extension, which is not built ({err}); "
            "build it with `pip install --no-build-isolation -e .` or use backend='reference'"
        ) from None
    if not compiled_op("_masked_gram_fused", device_type):
        raise BackendUnavailable(
            f"backend {name!r}: the compiled extension was built without {device_type.upper()} "
            "kernels; rebuild it with `pip install --no-build-isolation -e .`"
            + (" where torch has CUDA, without CAST_SKIP_CUDA=1" if device_type == "cuda" else "")
        )
    return Backend(
        name,
        torch.ops.cast._masked_gram_fused,
        torch.ops.cast._masked_gram_fused_backward,
        dtypes,
        (device_type,),
    )


def _triton() -> Backend:
    try:
        from .kernels import masked_gram as triton_masked_gram
    except Exception as err:  # no Triton, or one too old for the kernels (AttributeError)
        raise BackendUnavailable(
            f"backend 'triton' needs a recent Triton ({type(err).__name__}: {err}); "
            "`pip install -U triton` or choose another backend"
        ) from None
    device_types = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
    return Backend(
        "triton",
        triton_masked_gram.forward,
        triton_masked_gram.backward,
        triton_masked_gram.DTYPES,
        device_types,
    )


_LOADERS: dict[str, Callable[[], Backend]] = {
    "reference": _reference,
    "cpu": lambda: _compiled("cpu", "cpu", (torch.float32, torch.float64)),
    "cuda": lambda: _compiled("cuda", "cuda", FLOAT_DTYPES),
    "triton": _triton,
}


NAMES = tuple(_LOADERS)
# Each backend is looked for once: a missing one is remembered, not searched for on every call.
_loaded: dict[str, Backend | BackendUnavailable] = {}


def _load_failure(name: str) -> str:
    """Look for backend ``name`` once: ``""`` where it loaded, else why it cannot be had."""
    if name not in _loaded:
        try:
            _loaded[name] = _LOADERS[name]()
        except BackendUnavailable as err:
            _loaded[name] = err
    found = _loaded[name]
    return str(found) if isinstance(found, BackendUnavailable) else ""


def load(name: str) -> Backend:
    """The backend called ``name``; ``BackendUnavailable`` says why it cannot be had."""
    if name not in _LOADERS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    failure = _load_failure(name)
    if failure:
        raise BackendUnavailable(failure)
    return _loaded[name]


def available(name: str) -> bool:
    try:
        load(name)
    except BackendUnavailable:
        return False
    return True


def default_for(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend present for this device and dtype."""
    # CUDA before Triton: faster summed over the five VGG layers at 1024^2 in every dtype and
    # J = K measured (H100, a37e7bb: 27.1 against 35.4 ms float32 J = K = 3, 10.1 against 20.8
    # at J = K = 1, 26.9 against 36.8 bf16)
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if available(name) and dtype in load(name).dtypes:
            return name
    return "reference"


def choose(name: str | None, device: torch.device, dtype: torch.dtype) -> Backend:
    """Resolve ``name`` (or ``$CAST_BACKEND``, or the device's default) and check it fits."""
    backend = load(_requested(name) or default_for(device, dtype))
    name = backend.name
    if device.type not in backend.device_types:
        hint = " (set TRITON_INTERPRET=1 to run it on CPU)" if name == "triton" else ""
        raise BackendUnavailable(
            f"backend {name!r} runs on {'/'.join(backend.device_types)} tensors, "
            f"got {device.type}{hint}"
        )
    if dtype not in backend.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in backend.dtypes)
        raise BackendUnavailable(
            f"backend {name!r} takes {names} features, got {str(dtype).removeprefix('torch.')}; "
            "convert the features or use backend='reference'"
        )
    return backend


def choose_name(name: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``choose(name, device, dtype).name``, for code that torch.compile traces: the look-up
    runs outside the trace (imports, and the cache of backends, which a trace would read once
    and keep: a second backend first looked for in the same trace was missing from it)."""
    chosen, failure = _chosen(_requested(name), device.type, dtype)
    if failure:
        raise BackendUnavailable(failure)
    return chosen


@torch.compiler.assume_constant_result  # torch.compile takes the answer, not the look-up
def _chosen(name: str | None, device_type: str, dtype: torch.dtype) -> tuple[str, str]:
    """``(the backend's name, "")``, or ``("", why none can run these features)``."""
    try:
        return choose(name, torch.device(device_type), dtype).name, ""
    except BackendUnavailable as err:
        return "", str(err)


def _requested(name: str | None) -> str | None:
    """``name``, else ``$CAST_BACKEND`` where set; ``ValueError`` for a name that is none."""
    if not name and os.environ.get(ENV_VAR):
        name = os.environ[ENV_VAR]
        if name not in _LOADERS:
            raise ValueError(
                f"{ENV_VAR}={name!r} is not a backend; choose one of {', '.join(NAMES)} or unset it"
            )
    return name
