"""The ``cast`` command: ``cast stylize``, ``cast swap`` and ``cast mask``.

Defaults come from ``cast.stylize``'s signature, so they are defined in one place. Every
``CastError`` is printed as one line, ``cast: error: ...``, with exit status 2; Ctrl-C (SIGINT)
and SIGTERM write the latest image (when a step made one) and exit with 130 and 143. Under
torchrun, rank 0 alone prints the plan and says where the image is, and an error every rank
meets alike is printed once (``_print_error``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import signal
import sys
import threading
import time
import warnings

from . import checks, images, masks
from ._startup import is_first_on_machine, is_rank_zero, rank
from .backends import NAMES as BACKENDS
from .backends import BackendUnavailable
from .errors import CastError, MaskWarning, RankError
from .losses import HIGH_ORDER_PRESETS_DOC
from .memory import HISTORIES
from .network import POOLINGS
from .stylize import DEFAULT_LR, INITS, OPTIMIZERS, stylize
from .swap import heading, swap
from .weights import MODELS

# How long a rank that leaves an error to another to print waits before it exits (_print_error):
# under torchrun's agent, which stops every rank once one has exited, until it does so (the rank
# that prints may first save a large image: 2.9 s at 4096 px); launched by hand, a while.
SILENT_RANK_EXIT_DELAY = 3.0
SILENT_RANK_EXIT_DELAY_UNDER_TORCHRUN = 120.0
DEFAULTS = {name: p.default for name, p in inspect.signature(stylize).parameters.items()}

STYLIZE_HELP = """\
Stylise CONTENT with one or more STYLE images.

Regions: --content-mask takes a colour-coded label image of CONTENT (each colour a region);
--style-mask, once per style image in order, gives its label image ('-' for none), and the same
colours pair regions. Or --soft-mask, once per region, takes a grey-scale mask of CONTENT
(white = inside); a single one makes two regions, white and the rest (`cast mask` writes such a
mask). Each of these options takes one file: repeat the option for more (--soft-mask a.png
--soft-mask b.png), so a STYLE after it is never taken for a mask. A style image without labels
is one whole region styling the content region of its position among the style images without
labels: with --soft-mask sky.png, the first style image styles the sky and the second the rest.
A region that no style image pairs with keeps its own look (--strict makes that an error).
"""


SWAP_HELP = """\
Exchange the look of paired regions between photos A and B (Chen & Hsu 2016, Fig. 1): A's
regions take the look of B's, B's take A's, everything unpaired keeps its own look.

--mask-a and --mask-b are both colour-coded label images (the same colours pair regions; a
colour only one photo has is kept) or both grey-scale soft masks, e.g. from `cast mask` (white
is exchanged, the rest kept).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other bad input."""

    def error(self, message: str):
        _print_error(f"{message}; see '{self.prog} --help'")
        self.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cast",
        description="Content-aware neural style transfer (CAST).",
        epilog="Each command's options: cast COMMAND --help.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser(
        "stylize",
        help="stylise an image",
        description=STYLIZE_HELP,
        epilog=HIGH_ORDER_PRESETS_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("content", metavar="CONTENT", help="the photo")
    s.add_argument("styles", metavar="STYLE", nargs="+", help="style image(s)")
    s.add_argument("-o", "--output", required=True, metavar="OUT",
                   help=f"result: {images.OUTPUT_FORMATS}")  # fmt: skip

    _add_render_options(s)
    s.add_argument("--content-mask", metavar="LABELS", help="colour-coded regions of CONTENT")
    s.add_argument("--style-mask", metavar="LABELS", action="append",
                   help="label image of a style image ('-' for none); once per style image, "
                   "in order")  # fmt: skip
    s.add_argument("--soft-mask", metavar="GREY", action="append",
                   help="grey-scale mask of a region; once per region")  # fmt: skip
    s.add_argument("--style-blend", metavar="W,W", help="weight of each style image, e.g. 3,7 "
                   "(default: they pool their pixels)")  # fmt: skip
    s.add_argument("--strict", action="store_true", help="every region must pair with a style")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan (size, tiles, L-BFGS history, memory) and stop, having "
        "decoded the images and checked the masks as the run would",
    )

    w = commands.add_parser(
        "swap",
        help="exchange the look of paired regions between two photos",
        description=SWAP_HELP,
        epilog=HIGH_ORDER_PRESETS_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("a", metavar="A", help="the first photo")
    w.add_argument("b", metavar="B", help="the second photo")
    w.add_argument("--mask-a", required=True, metavar="MASK", help="label image or soft mask of A")
    w.add_argument("--mask-b", required=True, metavar="MASK", help="label image or soft mask of B")
    w.add_argument("-o", "--output", required=True, nargs=2, metavar=("OUT_A", "OUT_B"),
                   help="A with B's look, B with A's look")  # fmt: skip
    _add_render_options(w)
    w.add_argument(
        "--dry-run",
        action="store_true",
        help="print both runs' memory plans (size, tiles, L-BFGS history, memory) and stop, "
        "having decoded the images and checked the masks as the runs would; writes nothing",
    )

    m = commands.add_parser(
        "mask",
        help="estimate a soft mask by alpha matting",
        description="Estimate a soft mask of IMAGE from a TRIMAP (white = inside, black = "
        "outside, grey = unknown; or scribbles on grey) by closed-form alpha matting, and "
        "write it as a grey-scale image for `cast stylize --soft-mask`.",
    )
    m.add_argument("image", metavar="IMAGE", help="the photo")
    m.add_argument("trimap", metavar="TRIMAP", help="trimap or scribbles: IMAGE's aspect, any size")
    m.add_argument("-o", "--output", required=True, metavar="OUT.png",
                   help="the soft mask, white = inside")  # fmt: skip
    m.add_argument("--size", type=int, default=None, metavar="PX",
                   help="long side of the mask, at most the image's own (default: the image's "
                   f"own); above {masks.MATTING_PIXELS / 1e6:.1f} megapixels the matting runs at "
                   f"about {masks.MATTING_PIXELS / 1e6:.1f} megapixels and its alpha is "
                   "upsampled")  # fmt: skip
    m.add_argument("-q", "--quiet", action="store_true",
                   help="do not say what is matted (warnings are still shown)")  # fmt: skip
    return parser


# Options of ``stylize`` that ``cast stylize`` and ``cast swap`` share, by their API names.
RENDER_OPTIONS = (
    "size", "iters", "scales", "high_order", "model", "pooling", "content_weight",
    "style_weight", "tv_weight", "optimizer", "lr", "init", "lbfgs_history", "tile", "spill",
    "style_scale", "content_layers", "style_layers", "seed", "save_every", "device", "backend",
    "preserve_color",
)  # fmt: skip


def _add_render_options(parser: argparse.ArgumentParser) -> None:
    def option(flag, name, kind, help, **kwargs):
        default = DEFAULTS[name]
        shown = "" if default is None else f" (default: {_listed(default)})"
        parser.add_argument(flag, dest=name, type=kind, default=default, help=help + shown,
                            **kwargs)  # fmt: skip

    option("--size", "size", int, "long side of the result in pixels", metavar="PX")
    option("--iters", "iters", int, "optimisation steps per scale", metavar="N")
    option("--scales", "scales", int, "scales, coarse to fine, each twice the last", metavar="N")
    option("--high-order", "high_order", str, "kernel preset or file (see below)",
           metavar="PRESET|FILE")  # fmt: skip
    option("--model", "model", str, f"{' or '.join(MODELS)} or a weights file",
           metavar="MODEL|PATH")  # fmt: skip
    option("--pooling", "pooling", str, "VGG pooling", choices=POOLINGS)
    option("--content-weight", "content_weight", float, "weight of the content term", metavar="W")
    option("--style-weight", "style_weight", float, "weight of the style term", metavar="W")
    option("--tv-weight", "tv_weight", float, "weight of total variation", metavar="W")
    option("--optimizer", "optimizer", str, "optimiser", choices=OPTIMIZERS)
    lr_defaults = ", ".join(f"{rate:g} for {name}" for name, rate in DEFAULT_LR.items())
    option("--lr", "lr", float, f"step size (default {lr_defaults})")
    option("--init", "init", str, f"starting image: {', '.join(INITS)} (the first style "
           "image) or an image file",
           metavar="INIT|PATH")  # fmt: skip
    option(
        "--lbfgs-history",
        "lbfgs_history",
        int,
        f"steps L-BFGS remembers (default: {HISTORIES[0]}, fewer when memory is short)",
        metavar="N",
    )
    option(
        "--tile",
        "tile",
        int,
        "run the network on tiles of PX pixels (a multiple of the network's stride, 16; 32 "
        "with pool5), each with a halo: memory of one crop, the same result (default: tile "
        "only what does not fit; 0: never); tiles smaller than the halos (24 px; 64 px for the "
        "layers after pool3, in tiles twice as wide) are valid but slow: the crops overlap more",
        metavar="PX",
    )
    parser.add_argument(
        "--spill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the image-sized state (image, gradient, content features, masks, Adam's "
        "moments) in temporary files ($TMPDIR, removed when the run ends, however it ends) "
        "and step Adam chunk by chunk: for images whose state does not fit in memory "
        "(default: only then; --no-spill: never)",
    )
    option("--style-scale", "style_scale", float,
           "style images at X times the result's size", metavar="X")  # fmt: skip
    option("--content-layers", "content_layers", _names, "content layers, by name",
           metavar="L,L")  # fmt: skip
    option("--style-layers", "style_layers", _names, "style layers, by name", metavar="L,L")
    option("--seed", "seed", int, "seed of the noise start (init noise)", metavar="N")
    option("--save-every", "save_every", int, "write the image so far to the output every N "
           "steps", metavar="N")  # fmt: skip
    option("--device", "device", str, "cpu, cuda, cuda:1, ... (default: cuda when present)")
    option("--backend", "backend", str, "masked Gram backend (default: $CAST_BACKEND, else "
           "the fastest present)", choices=BACKENDS)  # fmt: skip
    parser.add_argument("--preserve-color", action="store_true",
                        help="keep the content's colours")  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no plan line, no progress bar")  # fmt: skip


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _listed(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _weights(text: str | None) -> list[float] | None:
    """``"3,7"`` as ``[3.0, 7.0]``."""
    if text is None:
        return None
    try:
        return [float(weight) for weight in text.split(",")]
    except ValueError:
        raise CastError(f"--style-blend takes numbers separated by commas, got {text!r}") from None


def _rendering(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in RENDER_OPTIONS} | {"progress": not args.quiet}


def _stylize(args: argparse.Namespace) -> None:
    style_masks = None
    if args.style_mask is not None:
        style_masks = [None if path == "-" else path for path in args.style_mask]
    done = stylize(
        args.content,
        args.styles,
        content_mask=args.content_mask,
        style_masks=style_masks,
        soft_masks=args.soft_mask,
        output=args.output,
        strict=args.strict,
        style_blend=_weights(args.style_blend),
        dry_run=args.dry_run,
        **_rendering(args),
    )
    if args.dry_run:
        _print_plan(str(done))


def _swap(args: argparse.Namespace) -> None:
    done = swap(args.a, args.b, args.mask_a, args.mask_b, tuple(args.output),
                dry_run=args.dry_run, **_rendering(args))  # fmt: skip
    if args.dry_run:  # each plan under the line the run would announce it with
        a, b = args.a, args.b
        _print_plan(f"{heading(a, b, a)}\n{done[0]}\n{heading(b, a, a)}\n{done[1]}")


def _print_plan(text: str) -> None:
    """A dry run's plan on stdout, by rank 0 alone under torchrun: the ranks' plans are one
    (stylize checks)."""
    if not is_rank_zero():
        return
    try:
        print(text, flush=True)
    except OSError as e:  # stdout a full disk or a closed pipe
        # the line left in stdout's buffer would fail again, as a traceback, at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise CastError(f"cannot print the plan: {e.strerror or e}") from None


def _mask(args: argparse.Namespace) -> None:
    # before the matting, which can take a while
    checks.output(args.output, [("image", args.image), ("trimap", args.trimap)])
    if args.size is not None:  # larger than the image adds nothing: masks are resampled anyway
        checks.whole("--size", args.size, 1, max(images.image_size(args.image)))
    image = images.load_image(args.image, long_side=args.size)
    with warnings.catch_warnings():
        warnings.simplefilter("always", MaskWarning)
        warnings.showwarning = _warn_in_one_line
        trimap = masks.read_trimap(args.trimap, tuple(image.shape[-2:]))
        alpha = masks.matte(image, trimap, progress=not args.quiet)
    images.save_result(alpha.expand(3, -1, -1), args.output)


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None):
    """A warning as ``cast: warning: ...``, not Python's two lines naming our source."""
    print(f"cast: warning: {message}", file=sys.stderr, flush=True)


def _print_error(error: Exception | str) -> None:
    """``cast: error: ...`` on stderr; under torchrun once for the ranks that meet it alike.
    An error in the command or the files is the same on every rank of a machine: its first
    rank alone prints it (rank 0 on one machine); one of a rank's own (``RankError``: its
    torchrun variables, lost contact, its spill files, its memory) is printed by that rank. A
    rank other than 0 names itself."""
    if not (isinstance(error, RankError) or is_first_on_machine()):
        # torchrun stops every rank 0.1 s after one exits: a silent rank that left at once
        # could stop the rank that prints before it got there, and no rank would say why
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # its agent sets it
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(
                SILENT_RANK_EXIT_DELAY_UNDER_TORCHRUN if under_torchrun else SILENT_RANK_EXIT_DELAY
            )
        return
    message = str(error)
    if rank() != 0 and not message.startswith(f"rank {rank()} "):  # LostContact names it
        message = f"rank {rank()}: {message}"
    print(f"cast: error: {message}", file=sys.stderr)


def _file_version(path: str) -> tuple[int, int] | None:
    """Identifies what is at ``path`` now (saves replace the file, so the inode changes)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, job schedulers), handled as Ctrl-C is."""


def _terminate(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # only it takes handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    outputs = args.output if isinstance(args.output, list) else [args.output]
    before = [_file_version(output) for output in outputs]
    try:
        with _sigterm_as_interrupt():
            {"stylize": _stylize, "swap": _swap, "mask": _mask}[args.command](args)
    except (CastError, BackendUnavailable) as err:
        _print_error(err)
        return 2
    except KeyboardInterrupt as interrupt:
        code = 128 + (signal.SIGTERM if isinstance(interrupt, _Terminated) else signal.SIGINT)
        if not is_rank_zero():  # torchrun signals every rank; rank 0 wrote the image, it says
            return code
        wrote = [o for o, b in zip(outputs, before, strict=True)
                 if args.command != "mask" and _file_version(o) not in (None, b)]  # fmt: skip
        print(
            ("cast: terminated" if isinstance(interrupt, _Terminated) else "cast: interrupted")
            + (f"; the latest image is in '{wrote[-1]}'" if wrote else ""),
            file=sys.stderr,
        )
        return code
    return 0


def run() -> None:
    """The ``cast`` command: ``main()``, then an exit that a second Ctrl-C or SIGTERM cannot
    turn into a traceback (atexit handlers run for about a second): the run is over, so such a
    signal ends the process at once."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(code)
