"""``cast.stylize``: content-aware style transfer, from files or tensors to an image.

Reads top to bottom: load the images and masks, build the network, then per scale (coarse to
fine) build the targets and optimise the image, each scale starting from the last one's result.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from . import checks, distributed, images, masks, ondisk
from .errors import CastError, ImageError, MaskError, RankError
from .losses import high_order_kernels
from .memory import Plan, free_bytes, plan_memory
from .network import CONTENT_LAYERS, POOLINGS, STYLE_LAYERS, VGGFeatures
from .objective import build as build_objective
from .objective import geometry as tile_geometry
from .weights import DEFAULT_MODEL

ImageLike = str | os.PathLike | Tensor

DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults
OPTIMIZERS = tuple(DEFAULT_LR)
INITS = ("content", "noise", "style")


@dataclass
class Step:
    """What ``callback`` is handed after every optimisation step."""

    scale: int  # 1-based, coarse to fine
    scales: int
    step: int  # 1-based within the scale
    iters: int
    loss: float
    image: Tensor  # (3, H, W), a copy of the current image, unclamped


def stylize(
    content: ImageLike,
    styles: ImageLike | Sequence[ImageLike],
    *,
    content_mask: ImageLike | None = None,
    style_masks: Sequence[ImageLike | None] | None = None,
    soft_masks: Sequence[str | os.PathLike] | None = None,
    size: int = 512,
    iters: int = 200,
    scales: int = 2,
    high_order: str | os.PathLike = "neighbours",
    model: str = DEFAULT_MODEL,
    pooling: str = "max",
    content_weight: float = 0.065,
    style_weight: float = 1.0,
    tv_weight: float = 0.2,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    init: str | os.PathLike = "content",
    lbfgs_history: int | None = None,
    style_scale: float = 1.0,
    style_blend: Sequence[float] | None = None,
    content_layers: Sequence[str] = CONTENT_LAYERS,
    style_layers: Sequence[str] = STYLE_LAYERS,
    preserve_color: bool = False,
    seed: int = 0,
    save_every: int | None = None,
    output: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    strict: bool = False,
    progress: bool = True,
    callback: Callable[[Step], None] | None = None,
    backend: str | None = None,
    tile: int | None = None,
    spill: bool | None = None,
    dry_run: bool = False,
) -> Tensor | Plan:
    """Stylise ``content`` with ``styles``, region by region.

    Args:
        content: the photo, a path or a ``(3, H, W)`` RGB tensor in [0, 1].
        styles: one or more style images, paths or ``(3, Hs, Ws)`` tensors.
        content_mask: regions of the content image: a colour-coded label image (each colour a
            region), or a ``(K, H, W)`` tensor of soft masks in [0, 1].
        style_masks: one entry per style image: its label image (colours pair it with the
            content's regions), a ``(K, Hs, Ws)`` tensor in the content's region order, or
            ``None``. A style image without a mask is one whole-image region that styles content
            region ``i`` where ``i`` is its position among the style images without a mask (all
            of them style the only region when there is no content mask, blended).
        soft_masks: grey-scale images, one per content region (white = inside); a single one
            gives two regions, white and its complement. Instead of ``content_mask``.
        size: long side of the result in pixels.
        iters: optimisation steps per scale.
        scales: number of scales, coarse to fine; scale ``s`` of ``n`` has long side
            ``size / 2**(n - s)``.
        high_order: a preset of ``cast.losses.HIGH_ORDER_PRESETS`` or a kernel file.
        model: ``"vgg19"`` (ImageNet VGG-19), ``"vgg16-hed"`` or a weights file
            (``cast.weights``).
        pooling: ``"avg"`` or ``"max"``.
        content_weight, style_weight, tv_weight: weights of the three terms (see cast.losses).
        optimizer: ``"lbfgs"`` or ``"adam"``; ``lr`` its step size (default 1 and 0.02).
        init: start from ``"content"``, ``"noise"``, ``"style"`` (the first style image) or
            any image file (resized to the content's size).
        lbfgs_history: how many past steps L-BFGS remembers (each costs two image copies);
            default 50, fewer when the image's copies would not fit in memory.
        style_scale: the style images are taken at ``style_scale`` times the long side of the
            image being optimised (below 1: finer strokes relative to the result, above 1:
            coarser ones).
        style_blend: one weight per style image: where several style a region, its target is
            their Grams' weighted mean; default, they pool their positions (a larger style
            image counts more).
        content_layers, style_layers: the network's layers by name (``relu4_2``); the style
            layers weigh equally.
        preserve_color: keep the content's colours: only luminance takes the style.
        seed: seeds the noise initialisation; the same seed on the same device gives the
            same result.
        save_every: write the current image to ``output`` every this many steps.
        output: where the result goes (also written on Ctrl-C and when the loss diverges).
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when present.
        strict: every content region must pair with a style region.
        progress: show a progress bar.
        callback: called with a ``Step`` after every step.
        backend: backend of ``cast.masked_gram``; default the fastest one present.
        tile: run the network on tiles of this many pixels a side (a multiple of the
            network's total stride: 16, 32 with ``pool5``), each with a halo, so memory is one
            crop's whatever the image's size; the result is the untiled one (SPEC §5). ``0``
            never tiles; ``None`` tiles only what would not fit.
            A tile smaller than the halos (24 px; 64 px for the layers after pool3, which run
            in tiles twice as wide: ``cast.tiling``) is valid but slow: the crops overlap more.
        spill: keep the image-sized state (the image, its gradient, the content features, the
            masks on every layer's grid, Adam's moments) in unnamed files of the temporary
            directory (``$TMPDIR``) and step Adam a chunk of rows at a time (L-BFGS needs its
            history in memory); ``None``: only when it would not fit in memory otherwise.
        dry_run: only work out the memory plan (size, tiles, L-BFGS history, memory) and
            return it, without a step; the image files are decoded (not made float) and the
            masks read and checked as the run would, so that what the run would refuse of the
            files (a truncated photo, a mask of another aspect) is refused here.

    Returns:
        The stylised image, ``(3, H, W)`` float32 RGB in [0, 1] on the CPU; with ``dry_run``
        the ``cast.memory.Plan``.

    Raises:
        CastError: bad input (before any work), a diverging loss (the last good image is
        written to ``output`` when a step made one) or an image too large for the device's
        memory (before any work, or in mid-run when another process took memory since). Any
        error in mid-run writes the latest image to ``output`` first, when a step made one.
    """
    styles = [styles] if isinstance(styles, (str, os.PathLike, Tensor)) else list(styles)
    style_masks = None if style_masks is None else list(style_masks)
    soft_masks = None if soft_masks is None else list(soft_masks)
    device = _check_arguments(**locals())  # every argument, before any work
    # the caller's modes are not the run's: under their torch.inference_mode() the kernels, the
    # network and the image would be inference tensors, which autograd refuses to save; under
    # their autocast the network would run in 16 bits (64 px, 2 steps: pixels 0.04 off); under
    # their torch.set_default_device() what is made on the CPU (images, masks, the network's
    # constants) and moved to the device where needed would be made elsewhere (the CPU made
    # the default only where it is not: the mode costs every torch call about 1.5 us)
    on_cpu = torch.device("cpu") if torch.get_default_device().type != "cpu" else nullcontext()
    with torch.inference_mode(False), torch.autocast(device.type, enabled=False), on_cpu:
        kernels = high_order_kernels(high_order)
        # one process per device under torchrun, in the caller's process group if they made one
        with distributed.join(device) as (shard, device):
            return _run(**locals())


def _run(
    content, styles, content_mask, style_masks, soft_masks, size, iters, scales, high_order,
    model, pooling, content_weight, style_weight, tv_weight, optimizer, lr, init, lbfgs_history,
    style_scale, style_blend, content_layers, style_layers, preserve_color, seed, save_every,
    output, strict, progress, callback, backend, tile, spill, dry_run, kernels, shard, device,
    **_,
):  # fmt: skip
    """``stylize`` once its arguments are checked and its process group joined."""
    if not shard.main:  # rank 0 shows progress and writes files
        progress, output = False, None
    network = VGGFeatures(model, pooling).to(device)
    content_layers, style_layers = tuple(content_layers), tuple(style_layers)
    _check_layers(network, content_layers=content_layers, style_layers=style_layers)
    # before loading: a huge size would already exhaust memory when the image is resized
    halo, stride = tile_geometry(network, kernels, content_layers, style_layers)
    content_hw, style_hws = _loaded_sizes(content, styles, size, style_scale)
    # every rank plans with the least memory any has: their plans, so their tiles, must agree
    free = shard.least(device, free_bytes(device, shard.world))
    plan = plan_memory(network, content_layers, style_layers, content_hw, style_hws, device,
                       optimizer, lbfgs_history, tile, halo, stride, shard.world,
                       spill, free)  # fmt: skip
    style_side = style_long_side(size, style_scale)
    if dry_run:  # refuses the files the run would refuse: decoded, not made float
        for image, long_side in [(content, size), *((style, style_side) for style in styles)]:
            if not isinstance(image, Tensor):
                images.open_image(image, long_side=long_side)
        if isinstance(initial_file(init), (str, os.PathLike)):
            images.open_image(init, "init image", long_side=size)
        _regions(content_hw, style_hws, content_mask, style_masks, soft_masks, strict)
        # rank 0 shows the plan for all: it must be every rank's (on its own device)
        shard.check_same(device, {"other settings or image sizes": replace(plan, device=None)})
        return plan
    if plan.spill and optimizer != "adam":  # L-BFGS's history is image copies in memory
        optimizer, lr = "adam", None
    if progress:
        tqdm.write(str(plan), file=sys.stderr)

    content_image = _load(content, size)
    style_images = [_load(style, style_side) for style in styles]
    content_masks, style_region_masks = _regions(
        content_hw, style_hws, content_mask, style_masks, soft_masks, strict
    )
    # under torchrun every rank must have been given the same problem: they add up their sums
    if shard.world > 1:
        shard.check_same(device, {
            "other settings": (size, iters, scales, pooling, content_weight, style_weight,
                               tv_weight, optimizer, lr, lbfgs_history, style_scale, style_blend,
                               content_layers, style_layers, preserve_color, seed, strict, kernels,
                               plan.tile, plan.history, plan.spill),
            "another content image": _as_given(content),
            "other style images": [_as_given(style) for style in styles],
            "other masks": (_as_given(content_mask), [_as_given(m) for m in style_masks or []],
                            [_as_given(m) for m in soft_masks or []]),
            "another init image": init if initial_file(init) is None else _as_given(init),
            "other network weights": list(network.state_dict().values()),
        })  # fmt: skip

    generator = torch.Generator().manual_seed(seed)
    image = None
    stepped = False  # until a step is done, the image is the start, not a result

    def keep_latest() -> bool:
        """Writes the latest image to ``output`` when a step made one; whether it did."""
        # a non-finite image is caught by the next step's loss; what stopped it came first
        if output is None or not stepped or not torch.isfinite(_whole(image)).all():
            return False
        images.save_result(_finish(image, content_image, preserve_color), output)
        return True

    try:
        for scale, (h, w) in enumerate(_scale_sizes(content_image.shape[-2:], size, scales), 1):
            objective = build_objective(
                network,
                images.resize(content_image, (h, w)).to(device),
                [images.resize(s, images.fit(s.shape[-2:], style_long_side(max(h, w), style_scale)))
                 .to(device) for s in style_images],
                content_masks.to(device),
                [m.to(device) for m in style_region_masks],
                kernels.to(device),
                content_weight, style_weight, tv_weight, backend, plan.tile, shard,
                content_layers=content_layers, style_layers=style_layers, blend=style_blend,
                spill=plan.spill,
            )  # fmt: skip
            if image is None:
                image = _initial(init, content_image, style_images, generator).to(device)
            if scale == scales:  # they made the last targets: ~30 B/px less during the steps
                del style_images, content_masks, style_region_masks
                if not preserve_color:  # the colour transfer at the end needs the content
                    content_image = None
            image = images.resize(_whole(image).clamp(0, 1), (h, w))
            bar = tqdm(total=iters, desc=f"scale {scale}/{scales} {w}x{h}", disable=not progress)
            with bar:
                step_size = DEFAULT_LR[optimizer] if lr is None else lr
                if plan.spill:
                    steps = _adam_in_chunks(objective, ondisk.keep(image, True), iters, step_size)
                else:
                    steps = _optimise(objective, image, iters, optimizer, step_size, plan.history)
                for step, loss, current in steps:
                    image, stepped = current, True
                    bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                    bar.update()
                    if save_every and output and step % save_every == 0:
                        images.save_result(_finish(image, content_image, preserve_color), output)
                    if callback is not None:
                        callback(Step(scale, scales, step, iters, loss, _whole(image).clone()))
    except (KeyboardInterrupt, distributed.LostContact, ondisk.SpillFailed) as stopped:
        if keep_latest() and isinstance(stopped, ondisk.SpillFailed):  # say where the steps are
            raise CastError(f"{stopped}; the latest image is in '{output}'") from None
        raise
    except _Diverged as diverged:
        # at the first scale, an image before any good step is the start, not a result
        kept = output is not None and (diverged.good_steps > 0 or scale > 1)
        if kept:
            images.save_result(_finish(diverged.last_good, content_image, preserve_color), output)
        where = f"; the last good image is in '{output}'" if kept else ""
        if output is not None and not kept:
            where = f"; no step gave an image, '{output}' is left as it was"
        instead = ", or use --optimizer adam" if optimizer != "adam" else ""
        raise CastError(
            f"the loss became {diverged.loss} at step {diverged.step}; lower the learning rate "
            f"(--lr) or the weights{instead}{where}"
        ) from None
    except CastError:
        raise
    except Exception as error:  # the steps made so far are kept, whatever stopped them
        out_of_memory = _out_of_memory(error)
        if out_of_memory:  # what the failed step held, freed for the save
            objective = error.__traceback__ = None
        try:
            kept = keep_latest()
        except Exception:  # the device itself may have failed: its first error is the one to see
            kept = False
        if not out_of_memory:
            raise
        where = f"; the latest image is in '{output}'" if kept else ""
        # RankError: the memory is this rank's own, so under torchrun it alone meets it
        raise RankError(
            f"out of memory on {device} though the plan fitted (another process may have taken "
            f"memory since): lower --size or CAST_MEMORY_GIB, or give --tile a smaller "
            f"size{where}"
        ) from None

    result = _finish(image, content_image, preserve_color)
    if output is not None:
        images.save_result(result, output)
    return result


def _out_of_memory(error: Exception) -> bool:
    """Whether ``error`` is an allocation that failed: a GPU's ``OutOfMemoryError``, numpy's or
    Python's ``MemoryError`` (a spilled run reads its state through numpy), or the CPU
    allocator's RuntimeError."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _as_given(image: ImageLike | None) -> bytes | Tensor | None:
    """An image as the caller gave it, for the ranks to compare: a file's bytes, which decide its
    pixels, the settings given (a 16384x12288 photo is tens of MB as a JPEG but 2.4 GiB of
    float32 pixels, 2.5 s to hash); a tensor as it is."""
    return Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else image


def _check_arguments(
    content, styles, content_mask, style_masks, soft_masks, size, iters, scales, high_order,
    model, pooling, content_weight, style_weight, tv_weight, optimizer, lr, init, lbfgs_history,
    style_scale, style_blend, seed, save_every, output, device, backend, tile, spill, dry_run,
    **_,
) -> torch.device:  # fmt: skip
    """Every argument, before any work; the device to run on."""
    for name, value, allowed in (("optimizer", optimizer, OPTIMIZERS),
                                 ("pooling", pooling, POOLINGS)):  # fmt: skip
        checks.choice(name, value, allowed)
    init_file = initial_file(init)
    if init_file is not None and not (
        isinstance(init_file, (str, os.PathLike)) and Path(init_file).is_file()
    ):
        raise CastError(
            f"init {str(init)!r} is neither {', '.join(INITS)} nor an image file; check the "
            "spelling or the path"
        )
    checks.sizes(size, iters, scales, save_every, output)
    for flag, weight in (("--content-weight", content_weight), ("--style-weight", style_weight),
                         ("--tv-weight", tv_weight)):  # fmt: skip
        checks.real(flag, weight)
    if lr is not None:
        checks.real("--lr", lr, positive=True, maximum=checks.MAX_LR)
    if lbfgs_history is not None:  # None: the memory plan chooses
        checks.whole("--lbfgs-history", lbfgs_history, 1)
    checks.real("--style-scale", style_scale, positive=True, maximum=checks.MAX_STYLE_SCALE)
    checks.whole("--seed", seed, 0, checks.MAX_SEED)
    if tile is not None:
        checks.whole("--tile", tile, 0, checks.MAX_SIZE)
    # a string ("no") or number would be taken for true
    if not (spill is None or isinstance(spill, bool)):
        raise CastError(f"spill must be True, False or None, got {spill!r}")
    if not isinstance(dry_run, bool):
        raise CastError(f"dry_run must be True or False, got {dry_run!r}")
    if not styles:
        raise CastError("give at least one style image")
    _check_blend(style_blend, len(styles))
    if style_masks is not None and len(style_masks) != len(styles):
        raise CastError(
            f"got {len(style_masks)} style masks for {len(styles)} style images; give one per "
            "style image"
        )
    _check_mask_options(content_mask, style_masks, soft_masks)
    on = checks.device(device)
    checks.backend(backend, on)
    # (role, what a read error calls it, path or tensor or None)
    inputs = [("content image", "image", content)]
    inputs += [(f"style image {i + 1}", "image", s) for i, s in enumerate(styles)]
    inputs += [("init image", "init image", init_file)]
    inputs += [("content mask", "label image", content_mask)]
    inputs += [(f"style mask {i + 1}", "label image", m) for i, m in enumerate(style_masks or [])]
    inputs += [(f"soft mask {i + 1}", "soft mask", m) for i, m in enumerate(soft_masks or [])]
    if output is not None:
        read = [(role, given) for role, _, given in inputs]
        checks.output(output, read + [("kernel file", high_order), ("weights file", model)])
    for role, what, given in inputs:
        if isinstance(given, Tensor) and what == "image":
            checks.image_tensor(given, role)
    # every input file opens (headers only), so a bad path is reported before any download
    checks.readable([(what, given, MaskError if "mask" in what else ImageError)
                     for _, what, given in inputs])  # fmt: skip
    # from the headers: a thin image is refused before the network loads (and before the first
    # of ``swap``'s two runs writes its result)
    _check_short_sides(content, styles, size, scales, style_scale)
    return on


def initial_file(init: ImageLike | str | None) -> ImageLike | None:
    """The image a run starts from when ``init`` names one (a path or a tensor); ``None`` for
    the named starts (``INITS``)."""
    return None if isinstance(init, str) and init in INITS else init


def _check_blend(blend: Sequence[float] | None, styles: int) -> None:
    if blend is None:
        return
    if len(blend) != styles:
        raise CastError(
            f"{len(blend)} blend weights for {styles} style images; give one weight per style image"
        )
    if not all(0 <= weight < math.inf for weight in blend) or not sum(blend) > 0:
        raise CastError(f"blend weights must be finite, 0 or more, not all 0; got {list(blend)}")


def _check_mask_options(
    content_mask: ImageLike | None,
    style_masks: Sequence[ImageLike | None] | None,
    soft_masks: Sequence[str | os.PathLike] | None,
) -> None:
    """Which kinds of masks go together, from the arguments alone (before any file is read)."""
    labelled = style_masks is not None and any(m is not None for m in style_masks)
    if content_mask is not None and soft_masks:
        raise CastError("give either a content label image or soft masks, not both")
    if content_mask is None and not soft_masks and labelled:
        raise CastError(
            "style masks need a content mask whose regions they pair with; give the content's "
            "label image too (--content-mask), in the same colours"
        )
    if soft_masks and labelled:
        # soft masks carry no colours to pair style regions with
        raise CastError(
            "soft masks cannot pair with style masks; use label images for both, or one "
            "unlabelled style image per region"
        )


def _check_layers(network: VGGFeatures, **layers: tuple[str, ...]) -> None:
    for option, names in layers.items():
        flag = "--" + option.replace("_", "-")
        if not names:
            raise CastError(f"{flag} needs at least one layer name, e.g. relu4_2")
        unknown = [name for name in names if name not in network.layer_names]
        if unknown:
            relus = [name for name in network.layer_names if name.startswith("relu")]
            raise CastError(
                f"unknown layer {unknown[0]!r} in {flag} for {network.architecture}; its layers "
                f"are {relus[0]} ... {relus[-1]} (and conv*, pool*): {', '.join(relus)}"
            )


def _check_short_sides(
    content: ImageLike, styles: Sequence[ImageLike], size: int, scales: int, style_scale: float
) -> None:
    """Every image, at its size as loaded (``_loaded_sizes``), keeps a short side of
    ``checks.MIN_SHORT_SIDE`` at the coarsest scale."""
    content_hw, style_hws = _loaded_sizes(content, styles, size, style_scale)
    coarsest = round(size / 2 ** (scales - 1))
    named = [("content image", content, content_hw, 1.0)]
    named += [(f"style image {i + 1}", style, hw, style_scale)
              for i, (style, hw) in enumerate(zip(styles, style_hws, strict=True))]  # fmt: skip
    for role, image, hw, scale in named:
        h, w = images.fit(hw, style_long_side(coarsest, scale))
        if min(h, w) < checks.MIN_SHORT_SIDE:
            # named by its file: under ``cast swap`` photo B is the second run's content
            which = role if isinstance(image, Tensor) else f"{role} '{os.fspath(image)}'"
            advice = "raise --size or lower --scales" if scales > 1 else "raise --size"
            raise CastError(
                f"the {which} is {w}x{h} px at the coarsest scale; the network needs a short "
                f"side of at least {checks.MIN_SHORT_SIDE} px: {advice}"
            )


def _load(image: ImageLike, long_side: int) -> Tensor:
    """``(3, H, W)`` float32 RGB in [0, 1] with the long side ``long_side``."""
    if not isinstance(image, Tensor):
        return images.load_image(image, long_side=long_side)
    image = image.detach().float().cpu().clamp(0, 1)  # checked by _check_arguments
    return images.resize(image, images.fit(image.shape[-2:], long_side))


def _loaded_sizes(
    content: ImageLike, styles: Sequence[ImageLike], size: int, style_scale: float
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``(H, W)`` of the content and of each style image as ``_load`` gives them (the finest
    scale), from the files' headers."""
    style_side = style_long_side(size, style_scale)
    style_hws = [images.fit(image_hw(style), style_side) for style in styles]
    return images.fit(image_hw(content), size), style_hws


def style_long_side(long_side: int, style_scale: float) -> int:
    """The style images' long side beside a result of long side ``long_side`` (each scale's,
    the finest is ``size``): ``--style-scale`` times it, a pixel at least."""
    return max(1, round(long_side * style_scale))


def image_hw(image: ImageLike) -> tuple[int, int]:
    """``(H, W)`` of an image tensor or file, reading only the file's header."""
    if isinstance(image, Tensor):
        return tuple(image.shape[-2:]) if image.dim() == 3 else (1, 1)
    return images.image_size(image)


def _scale_sizes(hw: Sequence[int], size: int, scales: int) -> list[tuple[int, int]]:
    return [images.fit(hw, round(size / 2 ** (scales - s))) for s in range(1, scales + 1)]


def _regions(
    content_hw: tuple[int, int],
    style_hws: list[tuple[int, int]],
    content_mask: ImageLike | None,
    style_masks: Sequence[ImageLike | None] | None,
    soft_masks: Sequence[str | os.PathLike] | None,
    strict: bool,
) -> tuple[Tensor, list[Tensor]]:
    """Content masks ``(K, H, W)`` and, per style image, ``(K, Hs, Ws)`` in the same region
    order (all zeros for a region the style image does not have), for the content image at
    ``content_hw`` and the style images at ``style_hws`` (as ``_load`` gives them)."""
    # their count and kinds are _check_arguments' (before any work)
    style_masks = list(style_masks) if style_masks is not None else [None] * len(style_hws)

    names = None  # how an error names region k
    if isinstance(content_mask, Tensor):
        if not all(m is None or isinstance(m, Tensor) for m in style_masks):
            raise CastError("style masks must be tensors when the content mask is one")
        region_masks = checks.mask_tensor(content_mask, "content mask", content_hw, None)
        paired = [
            None if m is None else checks.mask_tensor(m, "style mask", hw, len(region_masks))
            for m, hw in zip(style_masks, style_hws, strict=True)
        ]
    elif content_mask is not None:
        if any(isinstance(m, Tensor) for m in style_masks):
            raise CastError("style masks must be label images when the content mask is one")
        # strictness is checked below, once unlabelled style images have their regions too
        regions = masks.label_masks(content_mask, style_masks, content_hw, style_hws)
        region_masks, paired = regions.content, list(regions.styles)
        names = [f"colour {colour}" for colour in regions.colours]
    elif soft_masks:
        region_masks = masks.soft_masks(list(soft_masks), content_hw)
        names = [f"region of soft mask '{path}'" for path in soft_masks]
        if len(region_masks) == 1:
            # one grey image: the white part and the rest are the two regions
            region_masks = torch.cat([region_masks, 1 - region_masks])
            names.append(f"region outside soft mask '{soft_masks[0]}'")
        paired = [None] * len(style_hws)
    else:
        region_masks = torch.ones(1, *content_hw)
        paired = [None] * len(style_hws)

    K = len(region_masks)
    unmasked = [i for i, m in enumerate(paired) if m is None]
    if K > 1 and len(unmasked) > K:
        raise CastError(
            f"{len(unmasked)} style images without masks but only {K} content regions; each "
            "unmasked style image styles the content region of its position among them: give "
            f"at most {K} of them, or more content regions"
        )
    for position, i in enumerate(unmasked):
        whole = torch.zeros(K, *style_hws[i])
        whole[0 if K == 1 else position] = 1
        paired[i] = whole
    _check_every_style_styles_something(region_masks, paired, names, style_masks)
    if strict:
        covered = torch.stack([m.flatten(1).amax(1) > 0 for m in paired]).any(0)
        if not covered.all():
            missing = torch.nonzero(~covered).flatten().tolist()
            described = ", ".join(names[k] if names else f"region {k}" for k in missing)
            raise CastError(
                f"content {described} pairs with no style region (--strict); paint it in a "
                "style label image, add a style image for it, or drop --strict"
            )
    return region_masks.float(), [m.float() for m in paired]


def _check_every_style_styles_something(
    region_masks: Tensor,
    paired: list[Tensor],
    names: list[str] | None,
    style_masks: list[ImageLike | None],
) -> None:
    """A style image whose regions are all empty in the content (an all-black soft mask, a
    label image without the content's colours) would be loaded and matched for nothing."""
    content_has = region_masks.flatten(1).amax(1) > 0
    for i, mask in enumerate(paired):
        lends = mask.flatten(1).amax(1) > 0
        if (lends & content_has).any():
            continue
        if not lends.any():  # its own mask has none of the content's regions
            own = style_masks[i]
            own = "mask tensor is empty" if isinstance(own, Tensor) else (
                f"label image '{own}' has none of the content's colours")  # fmt: skip
            raise CastError(
                f"style image {i + 1} would style nothing: its {own}; paint its regions in "
                "the colours of the content regions they style"
            )
        regions = [names[k] if names else f"region {k}" for k in torch.nonzero(lends).flatten()]
        raise CastError(
            f"style image {i + 1} would style nothing: the content {', '.join(regions)} it "
            f"styles {'is' if len(regions) == 1 else 'are'} empty; draw some of it, or give "
            "fewer style images"
        )


def _initial(init, content: Tensor, styles: list[Tensor], generator) -> Tensor:
    if init == "noise":
        return torch.rand(content.shape, generator=generator, dtype=content.dtype)
    if init == "style":
        return images.resize(styles[0], tuple(content.shape[-2:]))
    if init == "content":
        return content.clone()
    return images.resize(images.load_image(init, what="init image"), tuple(content.shape[-2:]))


class _Diverged(Exception):
    """The loss of ``step`` is not finite; ``last_good`` is the image after ``good_steps``."""

    def __init__(self, step: int, loss: float, last_good: Tensor, good_steps: int):
        self.step, self.loss, self.last_good, self.good_steps = step, loss, last_good, good_steps


def _optimise(objective, image: Tensor, iters: int, optimizer: str, lr: float, history: int):
    """Yield ``(step, loss, image)`` after each step; ``_Diverged`` on NaN/inf."""
    x = image.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
    if optimizer == "lbfgs":
        # one L-BFGS iteration per step() call, so steps are counted, shown and saved
        opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=history)
        step_once = lambda step: opt.step(closure)
    else:
        moments = torch.zeros_like(x), torch.zeros_like(x)

        def step_once(step: int) -> Tensor:
            loss = closure()
            _adam_step(x.detach(), x.grad, *moments, step, lr)
            return loss

    # image-sized copies cost most at large sizes: while the objective runs, only x, its new
    # gradient, the last good image and the optimiser's state are alive
    last_good, good_steps = image.detach(), 0  # the start (the caller's, never changed)

    def closure():
        nonlocal last_good
        x.grad = None  # the last gradient is not kept beside the new one
        loss, x.grad = objective.value_and_grad(x)
        if torch.isfinite(loss):  # the loss belongs to x before the step moves it
            last_good = x.detach().clone()
        return loss

    for step in range(1, iters + 1):
        loss = float(step_once(step).detach())
        if not math.isfinite(loss):
            raise _Diverged(step, loss, last_good, good_steps)
        good_steps = step - 1
        yield step, loss, x.detach()
    if not torch.isfinite(x).all():  # the last step diverged: no later loss would tell
        loss = float(objective.value_and_grad(x)[0])
        raise _Diverged(iters, loss, last_good, good_steps)


def _adam_step(x: Tensor, grad: Tensor, first: Tensor, second: Tensor, step: int,
               lr: float) -> None:  # fmt: skip
    """Adam's step ``step`` (from 1) of ``x`` in place, updating its moments ``first`` and
    ``second`` in place: ``torch.optim.Adam``'s arithmetic, bit for bit. Elementwise, so a
    chunk of rows at a time gives the numbers of the whole image at once."""
    beta1, beta2 = ADAM_BETAS
    first.lerp_(grad, 1 - beta1)
    second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    root = (1 - beta2**step) ** 0.5
    x.addcdiv_(first, (second.sqrt() / root).add_(ADAM_EPS), value=-step_size)


def _adam_in_chunks(objective, image: ondisk.OnDisk, iters: int, lr: float):
    """``_optimise`` with Adam for an image on disk: Adam is elementwise, so it steps a chunk of
    rows at a time with its moments on disk too."""
    first, second = image.zeros_like(), image.zeros_like()
    last_good, good_steps = image, 0  # the start (the caller's, never changed)
    for step in range(1, iters + 1):
        loss, grad = objective.value_and_grad(image)
        if not torch.isfinite(loss):
            raise _Diverged(step, float(loss), _whole(last_good), good_steps)
        last_good, good_steps, moved = image, step - 1, image.zeros_like()
        for rows in image.chunks():
            x, m, v = image.read(rows), first.read(rows), second.read(rows)  # copies: on disk
            _adam_step(x, grad.read(rows), m, v, step, lr)
            first.write(rows, m)
            second.write(rows, v)
            moved.write(rows, x)
        del grad
        image = moved
        yield step, float(loss), image
    if not all(torch.isfinite(image.read(rows)).all() for rows in image.chunks()):
        # the last step diverged: no later loss would tell
        loss = float(objective.value_and_grad(image)[0])
        raise _Diverged(iters, loss, _whole(last_good), good_steps)


def _whole(image: Tensor | ondisk.Store) -> Tensor:
    """The image in memory (read from its store)."""
    return image if isinstance(image, Tensor) else image.read()


def _finish(image: Tensor | ondisk.Store, content: Tensor, preserve_color: bool) -> Tensor:
    image = _whole(image).detach().float().cpu().clamp(0, 1)
    if preserve_color:
        image = transfer_luminance(image, images.resize(content, tuple(image.shape[-2:])))
    return image


# RGB -> YIQ (NTSC): Y is luminance, I and Q carry the colour.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    dtype=torch.float32, device="cpu")  # fmt: skip


def transfer_luminance(stylised: Tensor, content: Tensor) -> Tensor:
    """The stylised image's luminance with the content's colour (YIQ), ``(3, H, W)``.

    Gatys et al. (2017) transfer luminance only and keep the content's chroma; this applies
    the same split after the optimisation, which keeps the colours exactly.
    """
    y = torch.einsum("ij,jhw->ihw", _YIQ, stylised)[:1]
    iq = torch.einsum("ij,jhw->ihw", _YIQ, content)[1:]
    return torch.einsum("ij,jhw->ihw", torch.linalg.inv(_YIQ), torch.cat([y, iq])).clamp(0, 1)
