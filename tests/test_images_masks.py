"""Images in and out, region masks from labels, soft masks and matting."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cast.errors import CastError, ImageError, MaskError, MaskWarning
from cast.images import (
    fit,
    image_size,
    load_image,
    open_image,
    resize,
    save_image,
    save_result,
)
from cast.masks import (
    TRIMAP_BAND_PIXELS,
    inner,
    inner_bands,
    label_masks,
    matte,
    read_trimap,
    resample,
    soft_masks,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TUBINGEN, TRIMAP = EXAMPLES / "tubingen.jpg", EXAMPLES / "tubingen_trimap.png"

RED, GREEN, BLUE = (255, 0, 0), (0, 160, 0), (0, 0, 255)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# Images


def test_save_load_round_trip(tmp_path):
    image = torch.rand(3, 37, 53)
    save_image(image[None], tmp_path / "out.png")
    loaded = load_image(tmp_path / "out.png")
    assert loaded.dtype == torch.float32 and loaded.shape == (3, 37, 53)
    assert (loaded - image).abs().max() <= 0.5 / 255 + 1e-6  # only 8-bit quantisation


def test_save_clamps_and_writes_jpeg(tmp_path):
    image = torch.linspace(-1, 2, 3 * 32 * 32).reshape(3, 32, 32)
    save_image(image, tmp_path / "out.jpg")
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"
    loaded = load_image(tmp_path / "out.jpg")
    assert (loaded - image.clamp(0, 1)).abs().mean() < 0.02


def test_load_resizes_to_long_side():
    image = load_image(TUBINGEN, long_side=256)
    assert image.shape == (3, 192, 256)
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.1


def test_loaded_size_is_the_headers_fitted_once():
    # shrunk to 4x first, then fitted: 202x384 at 20 px came out 10x20, where every check made
    # from the header (a thin image's short side, the memory plan) counted 11x20
    path = EXAMPLES / "hoovertowernight.jpg"
    for long_side in (18, 20, 24):
        assert load_image(path, long_side).shape[1:] == fit(image_size(path), long_side)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).round().astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    image = load_image(tmp_path / "ramp16.png")
    expected = torch.from_numpy(ramp / 65535).float()
    assert image.shape == (3, 48, 64) and torch.allclose(image, expected.expand(3, -1, -1))
    assert torch.allclose(soft_masks([tmp_path / "ramp16.png"], (48, 64))[0], expected)


def test_large_images_are_shrunk_before_they_become_floats(tmp_path):
    # a photo's texture at 2400x1800: the result must match shrinking the float image
    photo = Image.open(EXAMPLES / "tubingen.jpg").resize((2400, 1800), Image.Resampling.BICUBIC)
    for name in ("large.png", "large.jpg"):
        photo.save(tmp_path / name, quality=95)
        assert max(open_image(tmp_path / name, long_side=64).size) == 4 * 64
        exact = resize(load_image(tmp_path / name), (48, 64))
        assert (load_image(tmp_path / name, long_side=64) - exact).abs().mean() < 1 / 255


def test_images_past_pils_size_limit_are_read_where_they_fit_in_memory(tmp_path, monkeypatch):
    # 13500 x 13500 = 182 MP, past the 179 MP that PIL refuses as a possible decompression bomb;
    # one grey level, so the file is small and decodes fast
    path = tmp_path / "huge.png"
    Image.new("L", (13500, 13500), 90).save(path)
    assert image_size(path) == (13500, 13500)
    image = load_image(path, long_side=32)
    assert image.shape == (3, 32, 32) and torch.allclose(image, torch.tensor(90 / 255))
    # where decoding would not fit, one line before any pixel is decoded
    monkeypatch.setenv("CAST_MEMORY_GIB", "0.1")
    refusal = r"'.*huge.png': its 13500x13500 pixels take 0.2 GiB to decode and 0.1 GiB is free"
    for read in (image_size, lambda path: load_image(path, long_side=32)):
        with pytest.raises(ImageError, match=refusal + "; make a smaller copy of it, or free"):
            read(path)


def test_rgb_files_count_the_4_bytes_a_pixel_pil_decodes_them_to(tmp_path, monkeypatch):
    Image.new("RGB", (1024, 1024), (10, 20, 30)).save(tmp_path / "rgb.png")
    monkeypatch.setenv("CAST_MEMORY_GIB", str(3.5 / 1024))  # 3.5 MiB: 3 bytes a pixel fit
    with pytest.raises(ImageError, match="its 1024x1024 pixels take 4 MiB to decode"):
        image_size(tmp_path / "rgb.png")


def test_resize():
    images = torch.rand(2, 3, 40, 60)
    out = resize(images, (20, 30))
    assert out.shape == (2, 3, 20, 30) and 0 <= out.min() and out.max() <= 1
    # Antialiased: a downscaled constant stays that constant; averaging, not sampling.
    assert torch.allclose(resize(torch.full((3, 40, 60), 0.3), (13, 17)), torch.tensor(0.3))
    assert torch.allclose(out.mean(), images.mean(), atol=0.01)


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_image(torch.zeros(3, 8, 8), target)
    before = target.read_bytes()

    def disk_full(self, file, *args, **kwargs):
        file.write(b"half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(CastError) as error:
        save_image(torch.ones(3, 8, 8), target)
    assert "No space left" in one_line(error) and str(target) in str(error.value)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.png"]  # no temporary file left behind


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_lossy_outputs_keep_the_texture(tmp_path, suffix):
    """WebP was written at PIL's default quality (80), JPEG's texture-keeping 95 only for .jpg."""
    # a grey texture: colour would measure the formats' chroma subsampling, not their quality
    coarse = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    grey = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic")[0].clamp(0, 1)
    image = grey.expand(3, -1, -1)
    save_image(image, tmp_path / f"ours{suffix}")
    ours = (load_image(tmp_path / f"ours{suffix}") - image).abs().mean()
    as_bytes = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(as_bytes).save(tmp_path / f"default{suffix}")  # PIL's default quality
    default = (load_image(tmp_path / f"default{suffix}") - image).abs().mean()
    assert ours < 0.8 * default, (ours, default)


def test_save_errors(tmp_path):
    with pytest.raises(CastError) as error:
        save_image(torch.zeros(3, 8, 8), tmp_path / "missing-dir" / "out.png")
    assert "missing-dir" in one_line(error)
    for name, message in [("out.xyz", "not an image format PIL writes"),
                          ("out.psd", "not an image format PIL writes"),
                          ("out.blp", "as BLP: "), ("out.ico", "ICO holds icons of at most"),
                          ("out.icns", "ICNS holds icons"),
                          ("out.gif", "GIF holds at most 256 colours")]:  # fmt: skip
        with pytest.raises(CastError, match=message):
            save_image(torch.zeros(3, 8, 8), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_save_writes_through_a_symbolic_link(tmp_path):
    # the link was replaced by a file; as cp and shell redirection do, its target is written
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "out.png").write_bytes(b"an earlier result")
    links = {"out.png": folder / "out.png", "new.png": "results/new.png"}  # the second dangles
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
        save_image(torch.zeros(3, 8, 8), tmp_path / name)
        assert os.readlink(tmp_path / name) == str(target)
        assert load_image(tmp_path / name).shape == (3, 8, 8)
    assert sorted(os.listdir(folder)) == ["new.png", "out.png"]  # no temporary file left
    (tmp_path / "lost.png").symlink_to("missing/lost.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    for name, message in [("lost.png", "no directory"), ("loop.png", "loop")]:
        with pytest.raises(CastError, match=message):
            save_image(torch.zeros(3, 8, 8), tmp_path / name)
        assert (tmp_path / name).is_symlink()


def test_saved_file_permissions(tmp_path):
    save_image(torch.zeros(3, 4, 4), tmp_path / "out.png")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~umask
    # a file replaced keeps its mode, as open() keeps it: a private result became 0644
    (tmp_path / "private.png").write_bytes(b"an earlier result")
    (tmp_path / "private.png").chmod(0o600)
    save_image(torch.zeros(3, 4, 4), tmp_path / "private.png")
    assert (tmp_path / "private.png").stat().st_mode & 0o777 == 0o600


def test_a_result_that_cannot_be_written_is_kept_in_the_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # a name as long as a name may be: the kept file's, longer, could not be made
    for name in ("out.jpg", "x" * 251 + ".jpg"):
        with pytest.raises(CastError) as error:
            save_result(torch.ones(3, 4, 6), tmp_path / "moved" / name)
        kept = list(tmp_path.iterdir())
        assert len(kept) == 1, kept
        assert one_line(error).endswith(f"; meanwhile the image is in '{kept[0]}'")
        assert load_image(kept[0]).shape == (3, 4, 6)
        kept[0].unlink()


def test_save_refuses_a_pipe_and_keeps_it(tmp_path):
    # the save renamed a new file over the pipe: a reader waited for ever, the pipe was gone
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to("pipe.png")
    for name in ("pipe.png", "link.png"):
        with pytest.raises(CastError, match="it is not a regular file; name a file"):
            save_image(torch.zeros(3, 4, 4), tmp_path / name)
    assert stat.S_ISFIFO((tmp_path / "pipe.png").stat().st_mode)
    assert sorted(os.listdir(tmp_path)) == ["link.png", "pipe.png"]


def _as_a_user(work) -> str:
    """``work()``'s ``CastError`` message ("" without one), run as a user who is not root
    (root writes read-only files): in a child process as nobody when the tests run as root."""
    if os.geteuid() != 0:
        try:
            work()
        except CastError as err:
            return str(err)
        return ""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's coverage is not collected)
        message = b""
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            work()
        except CastError as err:
            message = str(err).encode()
        except BaseException as err:  # anything else fails the test, with its text
            message = f"unexpected {type(err).__name__}: {err}".encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as got:
        message = got.read().decode()
    os.waitpid(child, 0)
    return message


NOBODY = 65534


def test_save_refuses_a_read_only_file_and_keeps_it():
    # the save renamed a new file over it, where open() refuses: a result made read-only to
    # keep it was lost
    folder = Path(tempfile.mkdtemp())  # in /tmp: pytest's folders are closed to other users
    try:
        kept = folder / "kept.png"
        kept.write_bytes(b"a result kept")
        kept.chmod(0o444)
        if os.geteuid() == 0:  # the child, as nobody, owns the folder and the file
            for path in (folder, kept):
                os.chown(path, NOBODY, NOBODY)
        Image.init()  # the plugins, read while the files under /root can be
        message = _as_a_user(lambda: save_image(torch.zeros(3, 4, 4), kept))
        assert "the file is read-only; make it writable (chmod u+w)" in message, message
        assert kept.read_bytes() == b"a result kept" and os.listdir(folder) == ["kept.png"]
    finally:
        shutil.rmtree(folder)


def test_unreadable_images(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), RED).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    for path in ("nope.jpg", "notes.jpg", "cut.jpg", "."):
        with pytest.raises(ImageError) as error:
            load_image(tmp_path / path)
        assert str(tmp_path / path) in one_line(error)


def test_image_size_is_the_upright_size_load_image_gives(tmp_path):
    # a phone photo stored landscape with EXIF "turn a quarter": shown, loaded and masked upright
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    for suffix in (".jpg", ".png", ".webp", ".tif"):  # PIL's TIFF reader turns its own size
        turned = tmp_path / f"turned{suffix}"
        Image.new("RGB", (64, 48), RED).save(turned, exif=exif.tobytes())
        assert image_size(turned) == tuple(load_image(turned).shape[1:]) == (64, 48), suffix


# Label masks


def draw_labels(height: int, width: int, with_disc: bool = True) -> np.ndarray:
    """Red top half, green bottom half, a blue disc in the middle."""
    labels = np.zeros((height, width, 3), np.uint8)
    labels[: height // 2], labels[height // 2 :] = RED, GREEN
    if with_disc:
        y, x = np.mgrid[:height, :width]
        disc = (y - 0.42 * height) ** 2 + (x - 0.6 * width) ** 2 < (0.2 * height) ** 2
        labels[disc] = BLUE
    return labels


def masks_of(labels: np.ndarray, colours) -> torch.Tensor:
    return torch.from_numpy(np.stack([(labels == c).all(-1) for c in colours])).float()


def near_colour(found, expected, tolerance=12):
    return all(abs(a - b) <= tolerance for a, b in zip(found, expected, strict=True))


def test_labels_survive_jpeg_noise_and_resampling(tmp_path):
    content = draw_labels(240, 320)
    Image.fromarray(content).save(tmp_path / "content.jpg", quality=15)
    # The style's labels were drawn at another size and resized smoothly: in-between colours.
    style = draw_labels(300, 300)
    Image.fromarray(style).resize((150, 150), Image.Resampling.BILINEAR).save(
        tmp_path / "style.jpg", quality=30
    )
    regions = label_masks(
        tmp_path / "content.jpg", [tmp_path / "style.jpg"], (240, 320), [(300, 300)]
    )
    assert len(regions.colours) == 3  # no in-between colour became a region
    order = [next(c for c in (RED, GREEN, BLUE) if near_colour(f, c)) for f in regions.colours]
    assert sorted(order) == sorted([RED, GREEN, BLUE])

    for found, truth in ((regions.content, content), (regions.styles[0], style)):
        expected = masks_of(truth, order)
        assert found.dtype == torch.float32 and found.shape == expected.shape
        assert torch.all(found.sum(0) == 1)  # every pixel in exactly one region
        # JPEG blocks and the 2x resampling only move the boundaries, by a few pixels.
        assert (found != expected).any(0).float().mean() < 0.02
        interior = torch.nn.functional.avg_pool2d(expected[None], 9, 1, 4)[0]
        settled = (interior == 0) | (interior == 1)
        assert torch.equal(found[settled], expected[settled])


def test_large_label_image_matches_nearest_resize(tmp_path):
    labels = draw_labels(1100, 1300)  # above the 2**20 pixels that vote: sampled
    Image.fromarray(labels).save(tmp_path / "labels.png")
    regions = label_masks(tmp_path / "labels.png", [], (333, 401), [])
    assert regions.colours == [GREEN, RED, BLUE]  # exact colours, by area
    index = torch.from_numpy(masks_of(labels, regions.colours).argmax(0).numpy())[None, None]
    expected = torch.nn.functional.interpolate(index.float(), (333, 401), mode="nearest-exact")
    assert torch.equal(regions.content.argmax(0), expected[0, 0].long())


def test_style_without_labels_and_unpaired_regions(tmp_path):
    Image.fromarray(draw_labels(60, 80)).save(tmp_path / "content.png")
    Image.fromarray(draw_labels(60, 80, with_disc=False)).save(tmp_path / "style.png")
    regions = label_masks(
        tmp_path / "content.png", [None, tmp_path / "style.png"], (60, 80), [(10, 10), (30, 40)]
    )
    assert regions.styles[0] is None
    disc = regions.colours.index(BLUE)
    assert regions.styles[1].shape == (3, 30, 40)
    assert regions.styles[1][disc].sum() == 0 and regions.styles[1].sum() == 30 * 40

    with pytest.raises(MaskError) as error:
        label_masks(
            tmp_path / "content.png", [tmp_path / "style.png"], (60, 80), [(30, 40)], strict=True
        )
    assert str(BLUE) in one_line(error)


def test_style_colours_missing_from_content_are_ignored(tmp_path):
    Image.fromarray(draw_labels(60, 80, with_disc=False)).save(tmp_path / "content.png")
    Image.fromarray(draw_labels(60, 80)).save(tmp_path / "style.png")
    regions = label_masks(
        tmp_path / "content.png", [tmp_path / "style.png"], (60, 80), [(60, 80)], strict=True
    )
    assert regions.colours == [RED, GREEN] or regions.colours == [GREEN, RED]
    assert 0 < regions.styles[0].sum() < 60 * 80  # the disc belongs to no region


def test_label_aspect_mismatch(tmp_path):
    Image.fromarray(draw_labels(60, 80)).save(tmp_path / "labels.png")
    label_masks(tmp_path / "labels.png", [], (61, 80), [])  # rounding is fine
    with pytest.raises(MaskError) as error:
        label_masks(tmp_path / "labels.png", [], (80, 80), [])
    assert "80x60" in one_line(error) and "80x80" in str(error.value)


def test_a_mask_over_its_image_fits_the_image_at_a_small_size(tmp_path):
    # a 640x205 panorama at --size 64 is 64x20 (20.5 rounded), 2.5 % off in aspect: its own
    # trimap and masks were refused as drawn over another image ("aspect ratios differ")
    Image.fromarray(draw_labels(205, 640)).save(tmp_path / "labels.png")
    grey = np.full((205, 640), 255, np.uint8)
    grey[:, :320] = 0  # a background too: a trimap needs both
    Image.fromarray(grey).save(tmp_path / "grey.png")
    label_masks(tmp_path / "labels.png", [], (20, 64), [])
    soft_masks([tmp_path / "grey.png"], (20, 64))
    read_trimap(tmp_path / "grey.png", (20, 64))
    Image.fromarray(np.full((480, 640), 255, np.uint8)).save(tmp_path / "other.png")
    with pytest.raises(MaskError, match="aspect ratios differ"):  # a 4:3 mask still is not
        soft_masks([tmp_path / "other.png"], (20, 64))
    # named as what it is: it was "mask '...other.png'"
    with pytest.raises(MaskError, match=f"^trimap '{tmp_path / 'other.png'}' is 640x480 but"):
        read_trimap(tmp_path / "other.png", (20, 64))


def test_photo_is_not_a_label_image(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    with pytest.raises(MaskError, match="no flat colour regions"):
        label_masks(tmp_path / "noise.png", [], (64, 64), [])
    # a photo has flat areas (sky, walls) that make a few colours, but many pixels near none
    photo = Image.open(EXAMPLES / "tubingen.jpg")
    photo.resize((256, 192)).save(tmp_path / "photo.png")
    with pytest.raises(MaskError, match=r"is not a label image: only \d+% of its pixels lie"):
        label_masks(tmp_path / "photo.png", [], (192, 256), [])
    with pytest.raises(MaskError) as error:
        label_masks(tmp_path / "missing.png", [], (64, 64), [])
    assert "missing.png" in one_line(error)


# Soft masks and resampling


def test_soft_masks(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 80).round().astype(np.uint8), (60, 1))
    Image.fromarray(ramp).save(tmp_path / "left.png")
    Image.fromarray(255 - ramp).convert("RGB").save(tmp_path / "right.jpg", quality=95)
    masks = soft_masks([tmp_path / "left.png", tmp_path / "right.jpg"], (30, 40))
    assert masks.shape == (2, 30, 40) and masks.dtype == torch.float32
    assert 0 <= masks.min() and masks.max() <= 1
    assert torch.allclose(masks.sum(0), torch.ones(30, 40), atol=0.03)
    assert masks[0, :, 0].max() < 0.05 and masks[0, :, -1].min() > 0.95
    with pytest.raises(MaskError, match="aspect"):
        soft_masks([tmp_path / "left.png"], (40, 40))


@pytest.mark.parametrize("rank", [3, 4])
def test_resample_keeps_range_and_mass(rank):
    masks = torch.rand(2, 3, 64, 48) ** 3
    masks = masks if rank == 4 else masks[0]
    half = resample(masks, (32, 24))
    assert half.shape == (*masks.shape[:-2], 32, 24)
    assert torch.allclose(half.mean((-2, -1)), masks.mean((-2, -1)), atol=1e-6)
    for size in ((13, 7), (5, 5), (100, 80)):  # sizes that do not divide, and upsampling
        out = resample(masks, size)
        assert out.shape[-2:] == size and 0 <= out.min() and out.max() <= 1
        assert torch.allclose(out.mean((-2, -1)), masks.mean((-2, -1)), atol=0.03)
    hard = (masks > 0.5).float()
    assert set(resample(hard, (64, 48)).unique().tolist()) <= {0.0, 1.0}


# Matting


@pytest.fixture(scope="module")
def small_tubingen():
    image = load_image(TUBINGEN, long_side=256)
    return image, read_trimap(TRIMAP, tuple(image.shape[1:]))


def test_inner_keeps_the_cells_far_from_a_regions_border():
    grid = torch.zeros(3, 8, 10)
    grid[0, :, :6] = 1  # the left 6 columns, and a border column half inside
    grid[0, :, 6] = 0.5
    grid[1] = 1 - grid[0]
    grid[2, 4, :] = 1  # one row: too thin to erode
    eroded = inner(grid, 2)
    expected = torch.zeros(8, 10)
    expected[:, :4] = 1  # the image's edges do not erode, the border does by 2 cells
    expected[:, 4] = 0.5
    torch.testing.assert_close(eroded[0], expected)
    assert eroded[1, :, :8].sum() == 0 and eroded[1, :, 8:].eq(torch.tensor([0.5, 1])).all()
    torch.testing.assert_close(eroded[2], grid[2])
    torch.testing.assert_close(inner(torch.ones(1, 3, 4), 2), torch.ones(1, 3, 4))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7])
def test_inner_in_bands_is_inner_whole(rows):
    """A large image's grids are eroded a band of rows at a time: the bands read the rows
    around them, and only the grid's own edges repeat."""
    generator = torch.Generator().manual_seed(rows)
    grid = torch.rand(3, 12, 9, generator=generator)
    grid[1] = grid[1].gt(0.3).float()
    grid[2] = 0
    grid[2, 7, 1:8] = 0.8  # one row: too thin for any radius, kept as it is
    whole = inner(grid, 2)
    bands = dict(inner_bands(grid, 2, rows))
    assert list(bands) == list(range(0, 12, rows))
    torch.testing.assert_close(torch.cat(list(bands.values()), dim=-2), whole, rtol=0, atol=0)
    assert whole[1].sum() < grid[1].sum() and whole[2].equal(grid[2])


def test_committed_trimap_fits_tubingen():
    trimap = Image.open(TRIMAP)
    assert trimap.size == (1024, 768) and trimap.mode == "L"  # drawn on the full-size photo
    width, height = Image.open(TUBINGEN).size
    assert width * 768 == height * 1024
    values = np.asarray(trimap)
    assert set(np.unique(values)) == {0, 128, 255}
    assert 0.2 < (values == 255).mean() < 0.4 and (values == 128).mean() < 0.15


def test_matte_separates_sky_from_town(small_tubingen):
    image, trimap = small_tubingen
    assert set(trimap.unique().tolist()) == {0.0, 0.5, 1.0}
    alpha = matte(image, trimap)
    assert alpha.shape == trimap.shape and 0 <= alpha.min() and alpha.max() <= 1
    assert torch.all(alpha[trimap == 1] == 1) and torch.all(alpha[trimap == 0] == 0)
    # In the skyline band (right of the tree) every clearly blue pixel comes out sky and every
    # reddish one (roofs) town; the band is 1.5 px a side at this size, so alpha is far from the
    # trimap's 0.5 but not binary (measured: mean |alpha - 0.5| = 0.31; sky 0.92, roofs 0.12).
    band = (trimap == 0.5).clone()
    band[:, : band.shape[1] // 4] = False
    red, blue, band_alpha = image[0][band], image[2][band], alpha[band]
    sky, roofs = band_alpha[blue - red > 0.25], band_alpha[red > blue]
    assert len(sky) > 100 and len(roofs) > 100
    assert torch.all(sky > 0.5) and torch.all(roofs < 0.5)
    assert sky.mean() > 0.85 and roofs.mean() < 0.15
    assert (band_alpha - 0.5).abs().mean() > 0.25


def test_matte_reduced_resolution_matches_full(small_tubingen):
    image, trimap = small_tubingen
    full = matte(image, trimap, max_pixels=None)
    reduced = matte(image, trimap, max_pixels=128 * 96)
    assert (full - reduced).abs().mean() < 0.01
    assert torch.all(reduced[trimap == 1] == 1) and torch.all(reduced[trimap == 0] == 0)


def test_matte_from_scribbles(small_tubingen):
    image, _ = small_tubingen
    scribbles = torch.full(image.shape[1:], 0.5)
    scribbles[20:24, 90:240] = 1  # a stroke across the sky
    scribbles[150:154, 20:240] = 0  # one across the river
    scribbles[100:104, 150:250] = 0  # one across the houses
    alpha = matte(image, scribbles, max_pixels=128 * 96)  # every pixel unknown: solve small
    assert alpha[5:40, 100:250].mean() > 0.9 and alpha[110:190].mean() < 0.1


def test_strokes_partly_lost_at_matting_resolution_warn():
    """Matting at reduced resolution knows a pixel only where all the mask's pixels in it are
    known: 2 px strokes off its grid vanished there without a word (2 px scribbles on the
    1024x768 tubingen matted at 512x384 lost 32 % of the white and 44 % of the black)."""
    image = load_image(TUBINGEN, long_side=128)
    scribbles = torch.full(image.shape[1:], 0.5)
    scribbles[4:14, 10:120] = 1
    scribbles[80:90, 10:60] = 0  # thick: kept, a cell thinner
    scribbles[41:43, 10:120] = scribbles[61:63, 10:120] = 0  # 2 px across the cells of 2x2
    with pytest.warns(MaskWarning) as warned:
        matte(image, scribbles, max_pixels=64 * 48)
    assert [str(w.message) for w in warned] == [
        "trimap: 47% of the black strokes' pixels vanish when matting at 64x48 (a pixel there "
        "is known only where all 2x2 of the mask's are: thinner strokes can fall between); "
        "draw them thicker or make the mask at most 64x48"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskWarning)
        matte(image, scribbles, max_pixels=None)


def test_bad_trimaps(small_tubingen, tmp_path):
    image, trimap = small_tubingen
    with pytest.raises(MaskError, match="foreground"):
        matte(image, torch.where(trimap == 1, 0.5, trimap))
    with pytest.raises(MaskError, match="background"):
        matte(image, torch.where(trimap == 0, 0.5, trimap))
    with pytest.raises(MaskError) as error:
        matte(image, trimap[:-1])
    assert "256x191" in one_line(error)
    known = (trimap > 0.5).float()
    assert torch.equal(matte(image, known), known)
    with pytest.raises(MaskError, match="aspect"):
        read_trimap(TRIMAP, (256, 256))


def test_a_colour_picture_is_refused_as_a_trimap(tmp_path):
    """The photo given for its trimap (both are files named on one command line) gave a noise
    matte and pymatting's solver hints; a grey trimap saved as JPEG still reads."""
    with pytest.raises(MaskError, match=r"^trimap '.*tubingen.jpg' is in colour; .* grey where"):
        read_trimap(TUBINGEN, (288, 384))
    as_jpeg = tmp_path / "trimap.jpg"
    Image.open(TRIMAP).convert("RGB").save(as_jpeg, quality=75)
    assert read_trimap(as_jpeg, (288, 384)).shape == (288, 384)


def test_a_grey_picture_that_is_no_trimap_is_refused(tmp_path):
    """A grey-scale photo given for its trimap (or the grey photo named twice) gave a matte that
    was the photo itself: a trimap is black, white and one grey, up to JPEG noise and edges."""
    photo = tmp_path / "grey_photo.png"
    Image.open(TUBINGEN).convert("L").save(photo)
    with pytest.raises(MaskError) as error:
        read_trimap(photo, (288, 384))
    assert one_line(error).startswith(f"trimap '{photo}' is not a trimap: only ")
    # what a trimap may be: lossy, resampled with soft edges, drawn small, or scribbles
    trimap = Image.open(TRIMAP)
    trimap.convert("RGB").save(tmp_path / "trimap.jpg", quality=10)
    trimap.resize((64, 48), Image.BILINEAR).save(tmp_path / "small.png")
    scribbles = np.full((48, 64), 128, np.uint8)
    scribbles[5, 10:50], scribbles[40, 5:60] = 255, 0
    Image.fromarray(scribbles).save(tmp_path / "scribbles.png")
    for name in ("trimap.jpg", "small.png", "scribbles.png"):
        assert read_trimap(tmp_path / name, (288, 384)).shape == (288, 384)


def test_strokes_lost_in_resizing_say_so(tmp_path):
    """Thin scribbles on a trimap shrunk to the mask's size fell between the pixels that
    nearest-neighbour resizing picks: "trimap has no foreground (white) pixels", which the user
    had drawn."""
    scribbles = np.full((288, 384), 128, np.uint8)
    scribbles[41, 20:360], scribbles[250:252, 10:370] = 255, 0
    Image.fromarray(scribbles).save(tmp_path / "scribbles.png")
    assert read_trimap(tmp_path / "scribbles.png", (288, 384)).eq(1).any()
    with pytest.raises(MaskError) as error:
        read_trimap(tmp_path / "scribbles.png", (36, 48))
    assert one_line(error).startswith(f"trimap '{tmp_path / 'scribbles.png'}': its white ")
    assert "48x36" in str(error.value) and "thicker" in str(error.value)


def test_a_large_trimap_is_read_a_band_at_a_time(tmp_path):
    """A camera-sized trimap was made float whole (and snapped, histogrammed, checked for colour
    as whole arrays) even for a small mask: 240 MiB of arrays at 12 MP, 600 MB at 27 MP. Read a
    band of rows at a time, its arrays are a band's, and the trimap is the same."""
    big = Image.open(TRIMAP).resize((4000, 3000), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png")
    tracemalloc.start()  # numpy's arrays are traced (PIL's decoding is not: 12 MB here)
    try:
        trimap = read_trimap(tmp_path / "big.png", (288, 384))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * TRIMAP_BAND_PIXELS < 4000 * 3000 * 4  # measured: 17 MiB; whole: 240 MiB
    # as the whole trimap snapped and resized (as it was read before)
    whole = torch.from_numpy(np.asarray(big) / 255)
    snapped = torch.where(whole <= 0.1, 0.0, torch.where(whole >= 0.9, 1.0, 0.5)).float()
    nearest = torch.nn.functional.interpolate(snapped[None, None], (288, 384), mode="nearest-exact")
    assert torch.equal(trimap, nearest[0, 0])


def test_strokes_partly_lost_in_resizing_warn(tmp_path):
    """Two of three black strokes fell between the pixels a shrunk trimap keeps and the matte
    lost what they marked, without a word (only strokes lost entirely were refused)."""
    scribbles = np.full((288, 384), 128, np.uint8)
    scribbles[20:40, 20:360] = 255
    scribbles[250:262, 100:200] = 0  # thick: kept at 8x smaller, one cell thinner
    scribbles[150, 10:370] = scribbles[200, 10:370] = 0  # 1 px: between the rows kept
    path = tmp_path / "scribbles.png"
    Image.fromarray(scribbles).save(path)
    with pytest.warns(MaskWarning) as warned:
        read_trimap(path, (36, 48))
    assert [str(w.message) for w in warned] == [
        f"trimap '{path}': 38% of the black strokes' pixels vanish at the mask's 48x36 (strokes "
        "thinner than 8 px fall between the pixels kept); draw them thicker or make the mask "
        "larger"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskWarning)
        read_trimap(path, (288, 384))
        read_trimap(TRIMAP, (48, 64))  # a trimap's wide regions lose only their edges


def test_a_trimap_without_foreground_or_background_names_its_file(tmp_path):
    # the refusal came from matte(), which takes a tensor: "trimap has no foreground (white)
    # pixels", whichever of the command's files that was
    for colour, where in ((0, "foreground (white)"), (255, "background (black)")):
        trimap = np.full((36, 48), 128, np.uint8)
        trimap[:, :10] = colour
        Image.fromarray(trimap).save(tmp_path / "trimap.png")
        with pytest.raises(MaskError) as error:
            read_trimap(tmp_path / "trimap.png", (36, 48))
        assert one_line(error) == (
            f"trimap '{tmp_path / 'trimap.png'}' has no {where} pixels; mark some of each"
        )


def test_sixteen_bit_label_image_keeps_its_grey_regions(tmp_path):
    """PIL's RGB conversion clips 16-bit values at 255: a mid-grey region (32768) was merged
    into the white one (65535), two regions where three were drawn."""
    levels = np.zeros((48, 64), np.uint16)
    levels[:, 20:40], levels[:, 40:] = 32768, 65535
    Image.fromarray(levels).save(tmp_path / "labels16.png")
    regions = label_masks(tmp_path / "labels16.png", [], (48, 64), [])
    assert sorted(regions.colours) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    assert sorted(regions.content.sum((1, 2)).tolist()) == [960, 960, 1152]


def test_a_colour_picture_is_refused_as_a_soft_mask(tmp_path):
    """A colour label image given to --soft-mask instead of --content-mask (or the photo itself)
    became a mask of its brightness, regions nobody drew."""
    Image.fromarray(draw_labels(60, 80)).save(tmp_path / "labels.png")
    with pytest.raises(MaskError) as error:
        soft_masks([tmp_path / "labels.png"], (30, 40))
    assert one_line(error).startswith(f"soft mask '{tmp_path / 'labels.png'}' is in colour; ")
    assert "--content-mask" in str(error.value)


def test_a_slow_pymatting_import_is_announced():
    """pymatting compiles its kernels on its first import after installing: `cast mask` waited
    33 s in silence, then said its matting would take 'up to about 1 s'. A slow import now says
    why first (here any import is slow: the notice's delay is 0)."""
    script = """
import sys, torch, cast.masks as masks
masks.MATTING_IMPORT_NOTICE_SECONDS = 0.0
image = torch.rand(3, 24, 32)
trimap = torch.full((24, 32), 0.5)
trimap[:6], trimap[-6:] = 1.0, 0.0
quiet = sys.argv[1] == "quiet"
masks.matte(image, trimap, progress=not quiet)
masks.matte(image, trimap, progress=not quiet)  # imported: nothing more to say
"""
    def stderr_lines(mode):
        run = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
        )
        return run.stderr.splitlines()

    loud = stderr_lines("loud")
    assert loud[0].startswith("loading pymatting: its first use after installing compiles it")
    assert [line.startswith("matting ") for line in loud[1:]] == [True, True]
    assert stderr_lines("quiet") == []
