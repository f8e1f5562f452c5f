"""Reading, resizing and writing images as float tensors in [0, 1]."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import CastError, ImageError

# Quality for lossy outputs (PIL's defaults: JPEG 75, WebP 80, AVIF 75): high enough that the
# stylised texture survives compression.
LOSSY_QUALITY = 95
LOSSY_FORMATS = ("JPEG", "WEBP", "AVIF")
# What to name in advice on an output's format.
OUTPUT_FORMATS = ".png, .jpg, .tif or .webp"


def open_image(
    path: str | os.PathLike,
    what: str = "image",
    error: type[CastError] = ImageError,
    long_side: int | None = None,
) -> Image.Image:
    """Open ``path`` with PIL, upright (EXIF orientation applied), fully decoded; with
    ``long_side``, shrunk (8 bits a channel) to at most ``SHRINK_MARGIN * long_side``.

    Every way of failing raises ``error``, one line naming ``what`` and the path, never a PIL
    traceback; 16-bit and float files with NaN, inf or out-of-range pixels fail too.
    """
    with _opened(path, what, error) as opened:
        opened.load()
        _check_values(opened, f"{what} '{path}'", error)
        if long_side is not None:
            opened = _reduce(opened, long_side)
        return ImageOps.exif_transpose(opened)


def image_size(
    path: str | os.PathLike, what: str = "image", error: type[CastError] = ImageError
) -> tuple[int, int]:
    """``(H, W)`` upright, as ``open_image`` gives it, from the header only (cheap); fails as
    ``open_image`` does."""
    with _opened(path, what, error) as opened:
        # the base class's getexif reads the header's EXIF only (PNG's own decodes the image)
        orientation = Image.Image.getexif(opened).get(ExifTags.Base.Orientation)
        # PIL's TIFF reader turns its size itself (and its pixels as they load)
        if orientation in _QUARTER_TURNS and opened.format != "TIFF":
            return opened.width, opened.height
        return opened.height, opened.width


# EXIF orientations that show the picture turned by a quarter: its sides swap once upright.
_QUARTER_TURNS = (5, 6, 7, 8)


@contextlib.contextmanager
def _opened(path: str | os.PathLike, what: str, error: type[CastError]):
    """``Image.open(path)`` (the header; pixels on ``load``), every failure one line."""
    path = Path(path)
    if not path.is_file():
        problem = "it is a directory" if path.is_dir() else "no such file"
        raise error(f"cannot read {what} '{path}': {problem}; check the path")
    try:
        with _without_pil_size_limit():
            opened = Image.open(path)
        with opened:
            _check_fits_in_memory(opened, f"{what} '{path}'", error)
            yield opened
    except UnidentifiedImageError:
        raise error(
            f"cannot read {what} '{path}': not an image format PIL knows; use PNG or JPEG"
        ) from None
    except OSError as e:
        raise error(f"cannot read {what} '{path}': {e}; is the file complete?") from None


# PIL refuses images over 179 MP (Image.MAX_IMAGE_PIXELS twice), a guard for servers against
# files that decode to more memory than they are worth. A file given to cast is its user's own
# picture, and high resolution is what cast is for, so the bound is the memory that decoding
# takes instead (_check_fits_in_memory). PIL's bound is a module global, put back after each
# open (under a lock, for threads that open images at the same time).
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_pil_size_limit():
    with _PIL_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _check_fits_in_memory(opened: Image.Image, named: str, error: type[CastError]) -> None:
    """Refuse, before decoding, an image whose pixels would not fit in free memory."""
    # not at the top: cast.memory imports cast.checks, which imports this module
    from .memory import amount, free_bytes

    width, height = opened.size
    needed = width * height * _BYTES_PER_PIXEL.get(opened.mode, 4)
    free = free_bytes(torch.device("cpu"))
    if free is not None and needed > free:
        raise error(
            f"cannot read {named}: its {width}x{height} pixels take {amount(needed)} to decode "
            f"and {amount(free)} is free; make a smaller copy of it, or free memory"
        )


# Bytes a pixel takes once PIL has decoded it, by mode: 4 where not listed (RGB, RGBA, LA, I
# and F are stored in 4 bytes a pixel).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}


def load_image(
    path: str | os.PathLike, long_side: int | None = None, what: str = "image"
) -> torch.Tensor:
    """Read an image as a ``(3, H, W)`` float32 RGB tensor in [0, 1]; an error names it
    ``what`` (as ``open_image``).

    With ``long_side``, the image is resized (antialiased) so that ``max(H, W) == long_side``,
    keeping its aspect ratio: ``fit(image_size(path), long_side)``, so a run knows the size
    from the header. Grey-scale (8 or 16 bit), palette and RGBA files become RGB.
    """
    if long_side is not None and long_side < 1:
        raise ImageError(f"image size must be a positive number of pixels, got {long_side}")
    picture = open_image(path, what, long_side=long_side)
    image = torch.from_numpy(pixels(picture, grey=False)).permute(2, 0, 1).contiguous()
    if long_side is not None:
        # fitted from the file's size, not the shrunk copy's: rounding twice put a side a pixel
        # off the size the header gives (hoovertowernight at 20 px came out 20x10, not 20x11)
        image = resize(image, fit(image_size(path, what), long_side))
    return image


# Images are shrunk in PIL, 8 bits a channel, to this many times the size asked for before
# they become float tensors: a 13300x13300 PNG asked for at 64 px took 5.9 GB and 43 s as
# float32, and 1.1 GB and 13 s (as long as a 64 px photo) this way. The antialiased bicubic
# resize then starts from 4x the target: 0.0008 mean, 0.01 largest difference (of 1) to
# resizing the float image directly (tubingen at 2400x1800 to 64 px; 2x: 0.0027, 0.03; JPEG's
# own 1/2-1/8 scaled decoding, PIL's draft: 0.0024, 0.03 even from 8x, so it is not used).
SHRINK_MARGIN = 4


def _reduce(picture: Image.Image, long_side: int) -> Image.Image:
    """Area-averaged (exact for any ratio, unlike ``Image.reduce``'s whole factors)."""
    width, height = picture.size
    if max(width, height) <= SHRINK_MARGIN * long_side or picture.mode not in _BOX_MODES:
        return picture
    h, w = fit((height, width), SHRINK_MARGIN * long_side)
    return picture.resize((w, h), Image.Resampling.BOX)


# PIL modes that resize with a box filter (palette and 1-bit images do not).
_BOX_MODES = ("L", "LA", "RGB", "RGBA", "I", "F", "I;16")


# A picture whose R, G and B differ by at most this much (0-255) everywhere is grey.
GREY_TOLERANCE = 8
# PIL modes with more than 8 bits per pixel, and the value that stands for white in each.
_WIDE_MODES = {"I": 65535.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "F": 1.0}


def pixels(picture: Image.Image, grey: bool) -> np.ndarray:
    """``(H, W, 3)`` RGB, or ``(H, W)`` grey when ``grey``, float32 in [0, 1].

    16-bit and float grey images are scaled, not clipped at 255 as PIL's ``convert`` does.
    """
    if picture.mode in _WIDE_MODES:
        values = np.asarray(picture.convert("F"), dtype=np.float32) / _WIDE_MODES[picture.mode]
        values = np.clip(values, 0, 1)
        return values if grey else np.repeat(values[..., None], 3, axis=-1)
    return np.asarray(picture.convert("L" if grey else "RGB"), dtype=np.float32) / 255


def is_grey(picture: Image.Image) -> bool:
    """Whether R, G and B differ by at most ``GREY_TOLERANCE`` everywhere (JPEG's noise)."""
    rgb = np.asarray(picture.convert("RGB"), dtype=np.int16)
    return int(np.ptp(rgb, axis=-1).max()) <= GREY_TOLERANCE


def _check_values(picture: Image.Image, name: str, error: type[CastError]) -> None:
    """Wide (16/32-bit, float) files hold numbers that may be NaN or out of range."""
    if picture.mode not in _WIDE_MODES:
        return
    values = np.asarray(picture.convert("F") if picture.mode != "F" else picture)
    if not np.isfinite(values).all():
        raise error(f"{name} holds NaN or infinite pixels")
    white = _WIDE_MODES[picture.mode]
    if values.min() < 0 or values.max() > white:
        raise error(
            f"{name} holds pixels from {values.min():.4g} to {values.max():.4g}; "
            f"this format's pixels must lie in [0, {white:g}]"
        )


def fit(hw: Sequence[int], long_side: int) -> tuple[int, int]:
    """``(h, w)`` with ``max(h, w) == long_side`` and the aspect ratio of ``hw``."""
    h, w = hw
    scale = long_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(..., 3, H, W)`` images to ``size = (h, w)``: bicubic, antialiased, in [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    lead = image.shape[:-3]
    flat = image.reshape(-1, *image.shape[-3:])
    out = F.interpolate(flat, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    # Bicubic overshoots at sharp edges; images live in [0, 1].
    return out.clamp_(0, 1).reshape(*lead, *out.shape[-3:])


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _permissions(target: Path) -> int:
    """What ``open(target, "w")`` leaves: an existing file's mode, else 0666 less the umask."""
    try:
        return target.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


# Formats that would not hold the result as it is: ICO holds at most 256x256 px (a 300x200
# result came out 128x85), ICNS fixed squares (it came out 1024x1024), GIF a palette.
_NOT_WHOLE = {
    "ICO": "icons of at most 256x256 px",
    "ICNS": "icons of fixed square sizes",
    "GIF": "at most 256 colours",
}


def check_writable(path: str | os.PathLike) -> str:
    """PIL's format name for ``path``'s suffix; ``CastError`` when PIL cannot write that format
    as RGB, ``path`` is a directory, or the file cannot be made there (through a symbolic link:
    at its target). Cheap, so callers check before a long run."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format not in Image.SAVE:
        raise CastError(f"cannot write '{path}': not an image format PIL writes; end it in .png")
    if image_format in _NOT_WHOLE:
        raise CastError(
            f"cannot write '{path}': {image_format} holds {_NOT_WHOLE[image_format]}, not the "
            f"whole result; end it in {OUTPUT_FORMATS} (and convert that)"
        )
    try:
        # some formats PIL writes take no RGB (.blp, .xbm): try one pixel
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError, KeyError) as e:
        raise CastError(f"cannot write '{path}' as {image_format}: {e}; end it in .png") from None
    target = _written(path)
    folder = target.parent
    if not folder.is_dir():
        raise CastError(f"cannot write '{path}': no directory '{folder}'; create it first")
    if target.is_dir():
        raise CastError(f"cannot write '{path}': it is a directory; name a file in it")
    # the save renames a new file over the old one, which would replace a pipe or a device,
    # and a file the user may not write, where open() would refuse
    if target.exists() and not target.is_file():
        raise CastError(f"cannot write '{path}': it is not a regular file; name a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise CastError(
            f"cannot write '{path}': the file is read-only; make it writable (chmod u+w) or "
            "choose another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CastError(
            f"cannot write '{path}': the directory '{folder}' is not writable; choose another path"
        )
    # Make (and remove) the temporary file the save will make: the only sure test of a name
    # that is too long or a folder that refuses files (/proc) even to root.
    with _uninterrupted():
        try:
            handle, temporary = _temporary(target)
        except OSError as e:
            why = e.strerror or e
            raise CastError(f"cannot write '{path}': {why}; choose another path") from None
        os.close(handle)
        os.remove(temporary)
    return image_format


def _written(path: Path) -> Path:
    """The file a save to ``path`` replaces: through a symbolic link (a dangling one too), its
    target, as ``cp`` and shell redirection write; the link stays."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # where realpath stopped: the links lead back to themselves
        raise CastError(
            f"cannot write '{path}': its symbolic links go round in a loop; name another path"
        )
    return target


def _temporary(path: Path) -> tuple[int, str]:
    """A new private file beside ``path``, to be renamed over it."""
    return tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)


@contextlib.contextmanager
def _uninterrupted():
    """Ctrl-C and SIGTERM wait until the block is done: files are then complete or not there,
    and no temporary file is left behind. Their handlers run as soon as the block ends.

    Blocking the signals (``pthread_sigmask``) would not do: a signal sent to the process
    reaches any thread that does not block it, and torch's threads do not.
    """
    if threading.current_thread() is not threading.main_thread():  # only it takes handlers
        yield
        return
    caught = []
    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if previous is not None:  # None: installed outside Python, cannot be put back
            handlers[signum] = signal.signal(signum, lambda *received: caught.append(received))
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum, frame in caught:
            handler = handlers[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a ``(3, H, W)`` or ``(1, 3, H, W)`` image in [0, 1] (clamped) to ``path``.

    The format follows the suffix. The file appears complete or not at all: it is written to a
    temporary file beside ``path`` and renamed over it (a symbolic link stays: its target is
    written).
    """
    path = Path(path)
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"save_image expects a (3, H, W) image, got shape {tuple(image.shape)}")
    image_format = check_writable(path)
    target = _written(path)
    pixels = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    picture = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    options = {"quality": LOSSY_QUALITY} if image_format in LOSSY_FORMATS else {}
    with _uninterrupted():
        temporary = None
        try:
            handle, temporary = _temporary(target)
            with os.fdopen(handle, "wb") as file:
                picture.save(file, format=image_format, **options)
            # mkstemp makes the file private (0600); give it the permissions open() would: a
            # file replaced keeps its own (a private result stays private)
            os.chmod(temporary, _permissions(target))
            os.replace(temporary, target)
            temporary = None
        except OSError as e:
            raise CastError(
                f"cannot write '{path}': {e.strerror or e}; choose a writable path"
            ) from None
        except (ValueError, KeyError) as e:
            raise CastError(f"cannot write '{path}' as {image_format}: {e}") from None
        finally:
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)


def save_result(image: torch.Tensor, path: str | os.PathLike) -> None:
    """``save_image`` for an image that took a run to make: when ``path`` cannot be written
    after all (its folder was moved or the disk filled during the run; it was checked before),
    the image goes to a new file in the temporary folder, which the error names."""
    try:
        save_image(image, path)
    except CastError as err:
        kept = None
        try:
            with _uninterrupted():  # no empty file left by a Ctrl-C between the two
                name = Path(path).stem[:100]  # the output's name may take the most a name can
                handle, kept = tempfile.mkstemp(prefix=f"cast-{name}-", suffix=".png")
                os.close(handle)
                save_image(image, kept)
        except (OSError, CastError):
            if kept is not None and os.path.exists(kept):
                os.remove(kept)
            raise err from None
        raise CastError(f"{err}; meanwhile the image is in '{kept}'") from None
