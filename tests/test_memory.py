"""The memory plan plans for what will run: the layers chosen, the style images at their scale,
and tiles on the grid of the deepest layer's stride."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch

from cast import images
from cast.errors import CastError
from cast.losses import high_order_kernels
from cast.memory import HISTORIES, REGIONS, _activation_bytes_per_pixel, plan_memory
from cast.network import CONTENT_LAYERS, VGGFeatures
from cast.objective import geometry as tile_geometry
from cast.stylize import STYLE_LAYERS, stylize

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONTENT, STYLE = str(EXAMPLES / "tubingen.jpg"), str(EXAMPLES / "starry_night.jpg")
SIZE = 256
RUN = dict(size=SIZE, scales=1, device="cpu", dry_run=True)


@pytest.fixture
def ample(monkeypatch):
    """Plan as if 1000 GiB were free, so every plan is whole and only its sum is compared."""
    monkeypatch.setenv("CAST_MEMORY_GIB", "1000")


def _pixels(path: str, long_side: int) -> int:
    h, w = images.fit(images.image_size(path), long_side)
    return h * w


def test_the_plan_counts_the_content_layers_chosen(ample):
    deep, shallow = (stylize(CONTENT, STYLE, content_layers=(layer,), **RUN).need
                     for layer in ("relu4_2", "relu1_1"))  # fmt: skip
    # relu1_1 keeps 64 floats per pixel, relu4_2 512 per 8 x 8 pixels; the rest is the same
    assert shallow - deep == pytest.approx(4 * _pixels(CONTENT, SIZE) * (64 - 512 / 64))


def test_the_plan_counts_the_style_images_at_their_scale(ample):
    one, two = (stylize(CONTENT, STYLE, style_scale=scale, **RUN).need for scale in (1, 2))
    more = _pixels(STYLE, 2 * SIZE) - _pixels(STYLE, SIZE)
    # at least the style image and its masks in float32, at four times the pixels
    assert two - one >= 4 * (3 + REGIONS) * more


def test_a_stride_32_layer_gets_tiles_on_its_grid(monkeypatch):
    """pool5's cells are 32 px apart: the automatic plan picks tiles of a multiple of 32 px
    (tiles of 48 or 16 px would be refused as if the user had asked for them). The halo it
    sizes the crops by is the shallow segment's, on pool3's 8 px grid (cast.tiling)."""
    monkeypatch.setenv("CAST_MEMORY_GIB", "1")
    plan = stylize(CONTENT, STYLE, style_layers=("relu1_1", "pool5"), optimizer="adam",
                   **RUN | dict(size=1024))  # fmt: skip
    assert plan.tiles > 1 and plan.tile % 32 == 0 and plan.halo == 24


def test_planning_keeps_no_part_of_the_network_alive(ample):
    """The plan measures activations on a probe under saved-tensor hooks; a hook that kept what
    autograd saved made a cycle through the C++ graph, and every run leaked its network (55 MiB)."""
    network = VGGFeatures("vgg19", "max")
    weight = weakref.ref(next(network.parameters()))
    assert _activation_bytes_per_pixel(network, STYLE_LAYERS, torch.device("cpu")) > 0
    del network
    gc.collect()
    assert weight() is None


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_plan_counts_the_activations_under_the_callers_grad_mode(mode):
    """The probe records a graph as a step will: under a caller's no_grad it saved nothing, and
    the plan counted no activations (a 64 px run: 4.3 MB planned, 13.7 with them)."""
    network = VGGFeatures("vgg19", "max")
    measured = _activation_bytes_per_pixel(network, STYLE_LAYERS, torch.device("cpu"))
    with mode():
        assert _activation_bytes_per_pixel(network, STYLE_LAYERS, torch.device("cpu")) == measured


def test_tiles_made_small_by_the_processes_keep_the_lbfgs_history(ample):
    """A small image shared by two processes runs in tiles below 256 px because it must, not
    for memory: its history stays 50, as one process's (it was cut to 5, so the two runs
    differed)."""
    network = VGGFeatures("vgg19", "max")
    kernels = high_order_kernels("neighbours")
    halo, stride = tile_geometry(network, kernels, CONTENT_LAYERS, STYLE_LAYERS)
    plan = dict(content_layers=CONTENT_LAYERS, style_layers=STYLE_LAYERS, hw=(96, 128),
                style_hws=[(80, 128)], device=torch.device("cpu"), optimizer="lbfgs",
                history=None, tile=None, halo=halo, stride=stride)  # fmt: skip
    alone, shared = (plan_memory(network, processes=n, **plan) for n in (1, 2))
    assert alone.tiles == 1 and shared.tiles >= 2
    assert shared.history == alone.history == HISTORIES[0]


def test_a_refusal_under_adam_does_not_advise_adam(monkeypatch):
    monkeypatch.setenv("CAST_MEMORY_GIB", "0.01")  # at 1 MiB no size fits: no --size advice
    with pytest.raises(CastError, match=r"lower --size .*, use a larger device$") as caught:
        stylize(CONTENT, STYLE, optimizer="adam", **RUN)
    assert "--optimizer adam" not in str(caught.value)


def test_small_amounts_are_given_in_mib(monkeypatch):
    """A refusal on a small device (or under a small $CAST_MEMORY_GIB) names the bytes: it
    read "needs about 0.0 GiB ... but 0.0 GiB is free"."""
    monkeypatch.setenv("CAST_MEMORY_GIB", "0.001")
    with pytest.raises(CastError, match=r"needs about [\d.]+ [GM]iB on cpu but 1 MiB is free"):
        stylize(CONTENT, STYLE, tile=0, **RUN)
    monkeypatch.setenv("CAST_MEMORY_GIB", "1000")
    plan = str(stylize(CONTENT, STYLE, **RUN | dict(size=64)))
    assert re.search(r"about [1-9]\d* MiB of 1000.0 GiB free$", plan), plan


@pytest.mark.parametrize("options", [dict(tile=0), dict(spill=False), dict(tile=256)],
                         ids=["untiled", "in memory", "tiles of 256 px"])  # fmt: skip
def test_the_size_a_refusal_says_fits_fits(options, monkeypatch):
    """"lower --size (about 464 fits)" and then, at 464: "needs about 0.5 GiB ... but 0.5 GiB
    is free": the estimate left out the plan's headroom, so no suggested size ever fitted."""
    monkeypatch.setenv("CAST_MEMORY_GIB", "0.5")
    run = RUN | options | dict(size=4096)
    with pytest.raises(CastError, match=r"about \d+ fits") as refused:
        stylize(CONTENT, STYLE, **run)
    fits = int(re.search(r"about (\d+) fits", str(refused.value)).group(1))
    assert stylize(CONTENT, STYLE, **run | dict(size=fits)).height > 0


@pytest.mark.parametrize("gib", ["0", "-1", "nan", "inf"])
def test_a_memory_limit_that_is_not_a_positive_number_is_one_line(gib, monkeypatch):
    """-1 and nan were a ValueError traceback from the plan's arithmetic, 0 advised "about 0
    fits", inf planned with "inf GiB free"."""
    monkeypatch.setenv("CAST_MEMORY_GIB", gib)
    refusal = f"CAST_MEMORY_GIB must be a positive number of GiB, got '{gib}'"
    with pytest.raises(CastError, match=refusal):
        stylize(CONTENT, STYLE, **RUN)
