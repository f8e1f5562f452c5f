"""Exact tiling (SPEC §5): the tiled objective equals the whole image's, with the real network.

Images are small but wider than a tile plus its halo, so crops are cut inside the image; the
sizes are not multiples of 16, so the last tiles are ragged (one is 2 px wide and owns no cell of
the deepest layers).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from open_files import open_files

from cast import ondisk
from cast.errors import CastError
from cast.losses import high_order_kernels
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures
from cast.objective import Tiled, WholeImage, build
from cast.stylize import _optimise
from cast.tiling import geometry, plan_tiles

H, W, TILE = 40, 130, 32  # 2 x 5 tiles, the last row 8 px high, the last column 2 px wide
WEIGHTS = (0.3, 1.0, 2.0)

pytestmark = pytest.mark.slow


def _random(*shape, seed, dtype):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _problem(dtype, pooling="avg", preset="neighbours"):
    """The network and build() arguments: J = K = 3, two style images (one tiled itself)."""
    network = VGGFeatures(pooling=pooling).to(dtype)
    content = _random(3, H, W, seed=0, dtype=dtype)
    styles = [_random(3, 36, 60, seed=1, dtype=dtype), _random(3, 30, 24, seed=2, dtype=dtype)]
    regions = torch.zeros(3, H, W, dtype=dtype)
    regions[0, :, :70] = 1  # crosses tile borders at 32 and 64 and ends inside a tile
    regions[1, 10:, 50:] = 0.7
    regions[2] = _random(H, W, seed=3, dtype=dtype)
    style_masks = [_random(3, *s.shape[-2:], seed=4 + i, dtype=dtype) for i, s in enumerate(styles)]
    style_masks[1][2] = 0  # region 2 only in the first style image
    kernels = high_order_kernels(preset).to(dtype)
    return network, (content, styles, regions, style_masks, kernels, *WEIGHTS, "cpu")



def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {"f64-avg": (torch.float64, "avg"), "f32-max": (torch.float32, "max")}


@pytest.fixture(scope="module", params=list(CASES.values()), ids=list(CASES))
def built(request):
    """Both objectives, and the whole image's loss and gradient at a perturbed content image."""
    dtype, pooling = request.param
    network, args = _problem(dtype, pooling)
    whole, tiled = build(network, *args, tile=0), build(network, *args, tile=TILE)
    assert isinstance(tiled, Tiled) and type(whole) is WholeImage and len(tiled.plan) == 10
    assert [len(segment.plan) for segment in tiled.segments] == [10, 3]  # cut at pool3
    content = args[0]
    image = (content + 0.1 * _random(*content.shape, seed=9, dtype=dtype)).clamp(0, 1)
    return dtype, whole, tiled, image, whole.value_and_grad(image)


def test_tiled_equals_whole_image(built):
    dtype, whole, tiled, image, (loss, grad) = built
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for layer in STYLE_LAYERS:  # targets gathered tile by tile: the content's and the styles'
        target = whole.style_losses[layer].target
        assert _relative(tiled.style_losses[layer].target, target) <= tol, layer
    for layer in CONTENT_LAYERS:
        target = whole.content_losses[layer].target
        assert _relative(tiled.content_targets[layer].read(), target) <= tol, layer
    tiled_loss, tiled_grad = tiled.value_and_grad(image)
    assert abs(tiled_loss.item() - loss.item()) <= tol * abs(loss.item())
    assert _relative(tiled_grad, grad) <= tol


def test_a_step_runs_every_crop_twice_but_the_last(built, monkeypatch):
    """The statistics pass runs each segment's crops without autograd except the very last,
    whose graph the gradient pass starts with; every other crop runs again there."""
    _, _, tiled, image, _ = built
    calls, forward = [], tiled.network.forward

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiled.network, "forward", counting)
    tiled.value_and_grad(image)
    tiles = sum(len(segment.plan) for segment in tiled.segments)  # 10 + 3
    assert calls == [False] * (tiles - 1) + [True] * tiles


def test_state_spilled_to_disk_gives_the_same_loss_and_gradient(built, tmp_path):
    """Bit for bit: the same code reads the same numbers from a file instead of RAM."""
    dtype, _, tiled, image, _ = built
    if dtype != torch.float64:
        pytest.skip("one case shows it")
    spilled = build(VGGFeatures().double(), *_problem(dtype)[1], tile=TILE, spill=tmp_path)
    assert all(isinstance(s, ondisk.OnDisk) for s in [*spilled.content_targets.values(),
                                                      *spilled.style_masks.values()])  # fmt: skip
    loss, grad = tiled.value_and_grad(image)
    spilled_loss, spilled_grad = spilled.value_and_grad(image)
    assert torch.equal(spilled_loss, loss) and torch.equal(spilled_grad, grad)
    on_disk = ondisk.keep(image, tmp_path)
    disk_loss, disk_grad = spilled.value_and_grad(on_disk)
    assert isinstance(disk_grad, ondisk.OnDisk) and torch.equal(disk_loss, loss)
    assert torch.equal(disk_grad.read(), grad)

    # files: unnamed from the start, closed with their store, also when a step fails midway
    state = len(spilled.content_targets) + len(spilled.style_masks)
    assert os.listdir(tmp_path) == [] and len(open_files(tmp_path)) == state + 2  # image, grad
    del disk_grad
    calls, forward = [0], spilled.network.forward
    tiles = sum(len(segment.plan) for segment in spilled.segments)

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == tiles + 3:  # in the gradient pass
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    spilled.network.forward = failing
    with pytest.raises(KeyboardInterrupt):
        spilled.value_and_grad(on_disk)
    gc.collect()
    assert len(open_files(tmp_path)) == state + 1  # the failed step's gradient is gone
    del spilled, on_disk
    gc.collect()
    assert open_files(tmp_path) == []


def _with(tiled, index, halo=None, margins=None):
    """A copy of ``tiled`` whose segment ``index`` has another halo or other margins."""
    segment = tiled.segments[index]
    align = segment.plan.stride
    if halo is not None:
        plan = segment.plan
        segment = dataclasses.replace(segment, plan=plan_tiles(H, W, plan.tile, halo, align))
    if margins is not None:
        segment = dataclasses.replace(segment, margins=margins)
    other = copy.copy(tiled)
    other.crops = copy.copy(tiled.crops)
    other.crops.segments = tuple(segment if i == index else s
                                 for i, s in enumerate(tiled.segments))  # fmt: skip
    return other


def test_the_masks_on_the_grids_are_built_a_band_of_rows_at_a_time(monkeypatch):
    """With chunks of a few rows the masks on every style layer's grid, eroded band by band
    into their stores, and their mass are those made in one piece."""
    network, args = _problem(torch.float64)
    whole = build(network, *args, tile=TILE)
    monkeypatch.setattr(ondisk, "CHUNK_BYTES", 3 * 3 * W * 8)  # 3 rows of relu1_1's grid
    banded = build(network, *args, tile=TILE)
    for layer, store in whole.style_masks.items():
        assert torch.equal(banded.style_masks[layer].read(), store.read()), layer
    for a, b in zip(banded.inverse_mass, whole.inverse_mass, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_a_halo_one_position_too_small_breaks_it(built):
    """Each segment's halo is needed to the position (8 px cells up to pool3, 16 px after):
    the shallow one is pool3's reach on VGG-19, 22 px, so 24; the deep one relu5_1's reach (70
    px) plus the 3x3 kernels' (one 16 px cell) beyond pool3's, 86 - 22 = 64. One cell less
    leaves owned cells inexact (the equality above shows they suffice)."""
    dtype, whole, tiled, image, (loss, grad) = built
    if dtype != torch.float64:
        pytest.skip("one case shows it; float64 puts the halo's effect far above rounding")
    assert [(s.plan.halo, s.plan.stride) for s in tiled.segments] == [(24, 8), (64, 16)]
    for index, segment in enumerate(tiled.segments):
        narrow = _with(tiled, index, halo=segment.plan.halo - segment.plan.stride)
        assert _relative(narrow.value_and_grad(image)[1], grad) > 1e-6, index


def _one_cell_less(margins, layer, cell):
    """``margins`` with ``layer``'s one ``cell`` px narrower, and no later layer's wider."""
    narrowed, cap = {}, None
    for name, margin in margins.items():
        cap = margin - cell if name == layer else cap
        narrowed[name] = margin if cap is None else min(margin, cap)
    return narrowed


@pytest.mark.parametrize("index, layer", [(0, "conv1_1"), (0, "relu2_2"), (1, "relu4_1")])
def test_a_layer_trimmed_one_cell_too_narrow_breaks_it(built, index, layer):
    """A crop's deeper layers keep less of the halo: conv1_1 all 24 px (22 of them read),
    relu2_2 16 (pool3's reach less its own, 22 - 6), relu4_1 64 (56: the reach of the
    convolutions up to relu5_1 and its kernels' 16), relu5_1 16 (its 3x3 kernels' reach).
    Each margin is needed to the cell. (pool3, the cut, keeps one 8 px cell: it needs none
    beyond its owned cells, and the cell is only the floor every layer has.)"""
    dtype, whole, tiled, image, (loss, grad) = built
    if dtype != torch.float64:
        pytest.skip("one case shows it; float64 puts the trim's effect far above rounding")
    shallow, deep = (segment.margins for segment in tiled.segments)
    assert (shallow["conv1_1"], shallow["relu2_2"], shallow["pool3"], deep["relu4_1"],
            deep["relu5_1"]) == (24, 16, 8, 64, 16)  # fmt: skip
    segment = tiled.segments[index]
    narrow = _with(tiled, index, margins=_one_cell_less(segment.margins, layer,
                                                        segment.plan.stride))  # fmt: skip
    assert _relative(narrow.value_and_grad(image)[1], grad) > 1e-6


def test_without_high_order_kernels_the_halo_is_the_receptive_field():
    """With 1x1 kernels the reach alone sets the halos: pool3's 22 px (24), and relu5_1's 70
    beyond pool3's 22 (48). They are sufficient (wider ones change only float32 rounding, about
    1e-6) and needed (the deep one a cell narrower: about 3e-4)."""
    network, args = _problem(torch.float32, preset="none")
    assert geometry(network, CONTENT_LAYERS, STYLE_LAYERS, 0)[1] == 80  # one segment: reach 70
    tiled = build(network, *args, tile=TILE)
    assert [s.plan.halo for s in tiled.segments] == [24, 48]
    grad = tiled.value_and_grad(args[0])[1]
    for index, halo, low, high in ((0, 48, 0, 1e-5), (1, 96, 0, 1e-5), (1, 32, 1e-4, 1)):
        other = _with(tiled, index, halo=halo)
        assert low <= _relative(other.value_and_grad(args[0])[1], grad) <= high, (index, halo)


def test_two_lbfgs_steps_give_the_same_image(built):
    dtype, whole, tiled, image, _ = built
    if dtype != torch.float64:
        pytest.skip("float64 only: L-BFGS amplifies float32 rounding")
    results = []
    for objective in (whole, tiled):
        *_, (_, _, result) = _optimise(objective, image, 2, "lbfgs", 1.0, 50)
        results.append(result.clone())
    assert not torch.equal(results[0], image)
    assert _relative(results[1] - image, results[0] - image) <= 1e-9


def test_while_the_objective_runs_only_one_copy_of_the_image_is_kept_beside_it():
    """At large sizes every image-sized copy weighs: while the objective runs (a step's peak),
    the last gradient is let go and, besides the image itself, only the last good one is kept
    (not also a copy taken before the step); the start is not copied at all."""
    network, (image, styles, regions, style_masks, kernels, *rest) = _problem(torch.float32)
    shallow = dict(content_layers=("relu1_1",), style_layers=("relu1_1",))  # quick
    whole = build(network, image, styles[:1], regions[:1], [style_masks[0][:1]], kernels,
                  *rest, **shallow)  # fmt: skip

    def images():
        return {t.untyped_storage().data_ptr() for t in gc.get_objects()
                if isinstance(t, torch.Tensor) and t.shape == image.shape}  # fmt: skip

    before, seen = images(), []

    class Watched:
        def value_and_grad(self, x):
            seen.append((x.grad is None, len(images() - before)))
            return whole.value_and_grad(x)

    list(_optimise(Watched(), image, 2, "lbfgs", 1.0, 50))
    # x, and from the second step the last good image (the first is the start itself)
    assert seen == [(True, 1), (True, 2)]


def test_a_pooling_layer_of_stride_32_tiles_exactly():
    """pool5's cells are 32 px apart (its own pooling counts): masks on its grid, the deep
    segment's tiles and halo on multiples of 32 px. One style image: the other has no pool5
    cell."""
    network, (content, styles, regions, style_masks, *rest) = _problem(torch.float64)
    args = (content, styles[:1], regions, style_masks[:1], *rest)
    layers = dict(content_layers=("relu3_1",), style_layers=("relu2_1", "pool5"))
    whole, tiled = (build(network, *args, tile=tile, **layers) for tile in (0, 64))
    shallow, deep = (segment.plan for segment in tiled.segments)
    assert len(shallow) == 3 and len(deep) == 2 and deep.stride == 32 and deep.halo % 32 == 0
    image = (content + 0.1 * _random(*content.shape, seed=9, dtype=torch.float64)).clamp(0, 1)
    (loss, grad), (tiled_loss, tiled_grad) = (o.value_and_grad(image) for o in (whole, tiled))
    assert abs(tiled_loss.item() - loss.item()) <= 1e-9 * abs(loss.item())
    assert _relative(tiled_grad, grad) <= 1e-9


def test_every_pixel_is_owned_once_and_crops_sit_on_the_pooling_grid():
    plan = plan_tiles(100, 70, 32, 48, 16)
    owners = torch.zeros(100, 70, dtype=torch.int64)
    for tile in plan.tiles:
        top, bottom, left, right = tile.owned
        owners[top:bottom, left:right] += 1
        c_top, c_bottom, c_left, c_right = tile.crop
        assert c_top % 16 == 0 and c_left % 16 == 0
        assert c_top == max(0, top - 48) and c_right == min(70, right + 48)
    assert torch.equal(owners, torch.ones_like(owners)) and len(plan) == 4 * 3
    assert len(plan_tiles(100, 70, 0, 48, 16)) == 1 and len(plan_tiles(100, 70, 112, 48, 16)) == 1


@pytest.mark.parametrize("tile", [8, 40, -16])
def test_a_tile_off_the_stride_is_refused(tile):
    with pytest.raises(CastError, match="multiple of the network's total stride"):
        plan_tiles(100, 70, tile, 48, 16)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


PEAK_SCRIPT = """
import os, threading, torch
from pathlib import Path
from cast import images
from cast.stylize import stylize
H, W = 48, 4096  # a long strip: many tiles along it, each crop a fraction of the image
content = images.resize(images.load_image({content!r}, long_side=W), (H, W))
style = images.resize(images.load_image({style!r}, long_side=256), (H, W))
run = dict(size=W, scales=1, iters=1, progress=False, device="cpu", high_order="neighbours")
stylize(content[..., :64], style[..., :64], **run | dict(size=64))  # warm-up: weights, pools


def peak_growth(content=content, style=style, **options):
    # the resident set's peak above its level at the start, sampled every 5 ms
    current = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    start, peak, done = current(), [0], threading.Event()
    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], current())
    sampler = threading.Thread(target=sample)
    sampler.start()
    stylize(content, style, **run | options)
    done.set()
    sampler.join()
    return max(peak[0], current()) - start


# what any run needs whatever its size (the network, its weights read again): a crop's run
fixed = peak_growth(content=content[..., :64], style=style[..., :64], size=64)
os.environ["CAST_MEMORY_GIB"] = "0.09"  # tiles of 64 px (0.11: 192); whole: 0.6 GiB
plan = stylize(content, style, dry_run=True, **run)
tiled = peak_growth()
del os.environ["CAST_MEMORY_GIB"]
print(plan.tiles, plan.need, fixed, tiled, peak_growth(tile=0))
"""


def test_under_a_memory_cap_an_image_too_large_runs_tiled_in_a_crops_memory(tmp_path):
    """In a fresh process whose allocator hands every large block back when it is freed, so that
    the resident set follows what is alive, not what earlier runs left in malloc's pools."""
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT.format(content=str(EXAMPLES / "tubingen.jpg"),
                                         style=str(EXAMPLES / "starry_night.jpg")))  # fmt: skip
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    tiles, need, fixed, tiled, whole = (float(x) for x in done.stdout.split())
    assert tiles > 1 and need <= 0.09 * 2**30
    # measured: a crop's run 152 MiB (the network built and its weights read), tiled 167, whole 537
    grew = ", ".join(f"{x / 2**20:.0f}" for x in (fixed, tiled, whole))
    assert tiled - fixed < (whole - fixed) / 8, f"a crop's run, tiled, whole grew {grew} MiB"


SPILL_SCRIPT = """
import gc, math, sys, torch
from pathlib import Path
from cast import images, ondisk
from cast.losses import high_order_kernels
from cast.network import VGGFeatures
from cast.objective import build
H, W, spill = 128, int(sys.argv[1]), sys.argv[2]
content = images.resize(images.load_image({content!r}, long_side=W), (H, W))
style = images.resize(images.load_image({style!r}, long_side=W), (H, W))
masks = torch.stack([torch.linspace(0, 1, W).expand(H, W), torch.linspace(1, 0, W).expand(H, W)])
# shallow layers: little compute, a large image-sized state (relu1_2 holds 64 channels per px)
objective = build(VGGFeatures(), content, [style], masks, [masks],
                  high_order_kernels("neighbours"), 0.3, 1.0, 2.0, None, 128, spill=spill,
                  content_layers=("relu1_2",), style_layers=("relu1_1", "relu1_2"))
image = ondisk.keep(content, spill)
stores = [*objective.content_targets.values(), *objective.style_masks.values(), image, image]
state = sum(math.prod(s.shape) * s.dtype.itemsize for s in stores)  # in RAM, with the gradient
del content, style, masks
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the step's
objective.value_and_grad(image)
status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
print(state, int(status.split()[0]) * 1024)
"""


def test_a_spilled_step_holds_no_image_sized_state(tmp_path):
    """Peak RSS of one spilled step at two widths, each in a fresh process: it stays flat while
    the state it would hold in RAM grows by about 95 MB. glibc's mmap threshold is fixed, so
    the build's image-sized temporaries (a few MB here) are returned, not kept in the heap (at
    print sizes they are far above glibc's largest threshold and always are)."""
    script = tmp_path / "spill.py"
    script.write_text(SPILL_SCRIPT.format(content=str(EXAMPLES / "tubingen.jpg"),
                                          style=str(EXAMPLES / "starry_night.jpg")))  # fmt: skip
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
    (tmp_path / "spill").mkdir()
    runs = []
    for width in (512, 3072):
        done = subprocess.run([sys.executable, str(script), str(width), str(tmp_path / "spill")],
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append([int(x) for x in done.stdout.split()])
    (small_state, small_peak), (large_state, large_peak) = runs
    assert large_state - small_state > 80 * 2**20
    # measured: 0 MiB (504 MiB both)
    assert large_peak - small_peak < 0.1 * (large_state - small_state), runs
    assert os.listdir(tmp_path / "spill") == []
