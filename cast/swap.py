"""The paper's appearance swap (Chen & Hsu 2016, Fig. 1): two photos exchange the look of
paired regions, everything else keeps its own.

Two ``stylize`` runs: A styled by B under A's and B's masks, and B styled by A under the same
masks the other way round. A region that pairs with nothing keeps its look through the
unpaired-region fallback of ``stylize`` (its target is its own statistics).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile

import torch
from torch import Tensor

from . import checks, images, masks
from ._startup import is_rank_zero
from .errors import CastError, MaskError
from .stylize import ImageLike, image_hw, initial_file, style_long_side, stylize


def swap(
    a: ImageLike,
    b: ImageLike,
    mask_a: str | os.PathLike,
    mask_b: str | os.PathLike,
    outputs: tuple[str | os.PathLike | None, str | os.PathLike | None] = (None, None),
    **options,
) -> tuple[Tensor, Tensor]:
    """A with the look of B's paired regions, and B with the look of A's: ``(3, H, W)`` each.

    ``a`` and ``b`` are paths or ``(3, H, W)`` tensors in [0, 1], as ``stylize`` takes them;
    ``mask_a`` and ``mask_b`` are both colour-coded label images (the same colours pair
    regions; a colour only one photo has keeps its look) or both grey-scale soft masks (white
    is the region exchanged, the rest of each photo keeps its look). ``outputs`` are written
    when given; ``options`` are ``stylize``'s.
    """
    inputs = [("photo A", a), ("photo B", b), ("mask of A", mask_a), ("mask of B", mask_b)]
    # the files both runs read too: the second run would find its output among them only
    # after the first had written its own
    inputs += [
        ("init image", initial_file(options.get("init"))),
        ("kernel file", options.get("high_order")),
        ("weights file", options.get("model")),
    ]
    for output in outputs:  # both, before the first (long) run
        if output is not None:
            checks.output(output, inputs)
    if None not in outputs and _same_path(*outputs):
        first, second = map(os.fspath, outputs)
        if first == second:
            raise CastError(f"both swap outputs are '{first}'; give two different paths")
        # two names (a link, ./x/../) of one file: naming only the first would puzzle
        raise CastError(
            f"the swap outputs '{first}' and '{second}' are one file; give two different files"
        )
    grey = [_is_grey(mask_a), _is_grey(mask_b)]
    if grey[0] != grey[1]:
        raise CastError(
            "give both swap masks as colour label images or both as grey-scale soft masks; "
            f"'{mask_a if grey[0] else mask_b}' is grey, the other is not"
        )

    if options.get("strict"):
        raise CastError("swap keeps the look of a region that pairs with nothing: drop strict")
    # whose plan line and progress bars follow; on rank 0 only under torchrun, as stylize's
    announce = options.get("progress", True) and is_rank_zero()

    def run(content, content_mask, style, style_mask, output, **more):
        if announce and not (options | more).get("dry_run"):
            print(heading(content, style, a), file=sys.stderr, flush=True)
        if grey[0]:
            content_side, style_side = _long_sides(options)
            regions = dict(
                content_mask=_exchanged_and_rest(content_mask, content, content_side),
                style_masks=[_exchanged_only(style_mask, style, style_side)],
            )
        else:
            regions = dict(content_mask=content_mask, style_masks=[style_mask])
        return stylize(content, style, output=output, **regions, **options | more)

    first, second = (a, mask_a, b, mask_b, outputs[0]), (b, mask_b, a, mask_a, outputs[1])
    # the second run's refusals before the first writes its result (B too thin as content but
    # not as a style, a mask that fits its photo at one size but not at the other, too large
    # for the memory): its dry run checks what the run would, masks included
    if not options.get("dry_run"):  # a dry swap's second run is that dry run
        run(*second, dry_run=True)
    return run(*first), run(*second)


def heading(content, style, a) -> str:
    """The line that announces a swap's run of ``content`` in the look of ``style`` (a dry
    run's plan is printed under it)."""
    return f"swap: {_name(content, a)} in the look of {_name(style, a)}"


def _name(photo, a) -> str:
    """A photo's path, quoted, for the lines a swap prints; photo A or B for a tensor."""
    if isinstance(photo, (str, os.PathLike)):
        return f"'{os.fspath(photo)}'"
    return "photo A" if photo is a else "photo B"


def _is_grey(path: str | os.PathLike) -> bool:
    return images.is_grey(images.open_image(path, "mask", MaskError))


# stylize's defaults, for the sizes its runs give the photos
_DEFAULTS = {name: p.default for name, p in inspect.signature(stylize).parameters.items()}


def _long_sides(options: dict) -> tuple[int | None, int | None]:
    """The long sides a run gives its content and its style photo (``size``, and ``size`` times
    ``style_scale``); ``None`` where an option is no valid number (stylize says which)."""
    size, scale = (options.get(name, _DEFAULTS[name]) for name in ("size", "style_scale"))
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return None, None
    if not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        return size, None
    return size, style_long_side(size, scale)


def _soft(path: str | os.PathLike, image: ImageLike, long_side: int | None) -> Tensor:
    """The grey mask at the size the run gives ``image`` (its full size without one): read
    and checked there, as stylize reads its soft masks, not at the photo's full size (where
    a mask a few pixels off in aspect, fine at the run's size, was refused)."""
    hw = image_hw(image)
    return masks.soft_masks([path], hw if long_side is None else images.fit(hw, long_side))[0]


def _exchanged_and_rest(path, image, long_side) -> Tensor:
    """Two regions of ``image``: the mask's white part (exchanged) and the rest (kept)."""
    mask = _soft(path, image, long_side)
    return torch.stack([mask, 1 - mask])


def _exchanged_only(path, image, long_side) -> Tensor:
    """The same two regions for the image lending its look: only the white part lends it."""
    mask = _soft(path, image, long_side)
    return torch.stack([mask, torch.zeros_like(mask)])


def _same_path(first, second) -> bool:
    """Whether two output paths name one file, also through a link. Before they exist, names
    are compared as the system compares them: ``normcase`` folds case on Windows (``x.png`` and
    ``x.PNG``); on POSIX it folds nothing, so names that differ only in case in one folder ask
    the folder itself (macOS's default is case-blind)."""
    if os.path.exists(first) and os.path.exists(second):
        return os.path.samefile(first, second)
    first, second = os.path.realpath(first), os.path.realpath(second)
    if os.path.normcase(first) == os.path.normcase(second):
        return True
    folder = os.path.dirname(first)
    return first.lower() == second.lower() and folder == os.path.dirname(second) and (
        _case_blind(folder)
    )


def _case_blind(folder: str) -> bool:
    """Whether ``folder``'s file names ignore case: a probe file there, asked for by its name
    in upper case."""
    try:
        with tempfile.NamedTemporaryFile(prefix=".cast-case-", dir=folder) as probe:
            return os.path.exists(os.path.join(folder, os.path.basename(probe.name).upper()))
    except OSError:  # an unwritable or missing folder: the output's own check tells
        return False
