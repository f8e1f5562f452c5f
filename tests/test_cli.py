"""The ``cast`` command: a tiny real run, and bad input as one line with exit status 2."""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cast import cli, images
from cast.cli import main
from cast.stylize import stylize

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONTENT, STYLE = str(EXAMPLES / "tubingen.jpg"), str(EXAMPLES / "starry_night.jpg")
TINY = ["--size", "40", "--iters", "2", "--scales", "1", "--quiet"]


def _labels(path: Path, size: tuple[int, int], colours) -> str:
    """A label image: vertical stripes of ``colours``, ``size = (w, h)``."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    for i, colour in enumerate(colours):
        pixels[:, i * w // len(colours) : (i + 1) * w // len(colours)] = colour
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.slow
def test_stylize_end_to_end(tmp_path):
    out = tmp_path / "out.png"
    assert main(["stylize", CONTENT, STYLE, "-o", str(out), *TINY]) == 0
    assert images.load_image(out).shape == (3, 30, 40)


@pytest.mark.slow
def test_mask_then_stylize_with_the_soft_mask(tmp_path):
    trimap = np.full((30, 40), 128, np.uint8)
    trimap[:8], trimap[-8:] = 255, 0  # sky known at the top, town at the bottom
    Image.fromarray(trimap).save(tmp_path / "trimap.png")
    mask, out = tmp_path / "sky.png", tmp_path / "out.jpg"
    assert (
        main(["mask", CONTENT, str(tmp_path / "trimap.png"), "-o", str(mask), "--size", "40"]) == 0
    )
    alpha = images.load_image(mask)[0]
    assert alpha.shape == (30, 40) and alpha[:8].min() == 1 and alpha[-8:].max() == 0
    args = ["stylize", CONTENT, STYLE, STYLE, "--soft-mask", str(mask), "-o", str(out), *TINY]
    assert main(args) == 0 and out.is_file()


def test_help_shows_the_defaults_of_the_api(capsys):
    with pytest.raises(SystemExit):
        main(["stylize", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    signature = inspect.signature(stylize).parameters
    for flag in ("--size", "--iters", "--scales", "--high-order", "--model", "--pooling",
                 "--content-weight", "--style-weight", "--tv-weight", "--optimizer", "--init",
                 "--seed"):  # fmt: skip
        default = signature[flag[2:].replace("-", "_")].default
        # the default shown in this option's own help, before the next option
        pattern = rf"{flag} \S+ (?:(?! -).)*\(default: {re.escape(str(default))}\)"
        assert re.search(pattern, shown), f"{flag}: default {default} not shown"


BAD = {
    "missing image": (["stylize", "nowhere.jpg", STYLE], "cannot read image 'nowhere.jpg'"),
    "unreadable image": (["stylize", "{text}", STYLE], "not an image format"),
    "unknown preset": (["stylize", CONTENT, STYLE, "--high-order", "fancy"], "unknown high-order"),
    "bad kernel file": (["stylize", CONTENT, STYLE, "--high-order", "{kernels}"], "r odd"),
    "label aspect": (["stylize", CONTENT, STYLE, "--content-mask", "{square}"], "aspect ratios"),
    "strict unpaired": (
        ["stylize", CONTENT, STYLE, "--content-mask", "{two}", "--style-mask", "{one}", "--strict"],
        "(0, 0, 255) pairs with no style region",
    ),
    "style masks without content mask": (
        ["stylize", CONTENT, STYLE, "--style-mask", "{one}"],
        "style masks need a content mask",
    ),
    "unwritable output": (
        ["stylize", CONTENT, STYLE, "-o", "{tmp}/no/dir/out.png"],
        "no directory",
    ),
    "output format PIL cannot write": (
        ["stylize", CONTENT, STYLE, "-o", "{tmp}/out.psd"],
        "not an image format PIL writes",
    ),
    "output format without RGB": (["stylize", CONTENT, STYLE, "-o", "{tmp}/out.blp"], "as BLP"),
    "read-only output folder": (
        ["stylize", CONTENT, STYLE, "-o", "{read_only}/out.png"],
        "is not writable",
    ),
    "soft masks with style masks": (
        ["stylize", CONTENT, STYLE, "--soft-mask", "{square}", "--style-mask", "{one}"],
        "soft masks cannot pair with style masks",
    ),
    "unknown device": (["stylize", CONTENT, STYLE, "--device", "gpu"], "unknown device 'gpu'"),
    "too thin an image": (["stylize", "{thin}", STYLE], "raise --size or lower --scales"),
    "mask of a missing image": (["mask", "nowhere.jpg", "{square}"], "cannot read image"),
    "mask to a format PIL cannot write": (
        ["mask", CONTENT, "{square}", "-o", "{tmp}/alpha.psd"],
        "not an image format PIL writes",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_output(case, tmp_path, capsys):
    argv, message = BAD[case]
    (tmp_path / "text.jpg").write_text("not a picture")
    np.save(tmp_path / "kernels.npy", np.ones((1, 2, 2)))
    files = {
        "text": tmp_path / "text.jpg",
        "kernels": tmp_path / "kernels.npy",
        "square": _labels(tmp_path / "square.png", (50, 50), [(255, 0, 0)]),
        "two": _labels(tmp_path / "two.png", (40, 30), [(255, 0, 0), (0, 0, 255)]),
        "one": _labels(tmp_path / "one.png", (32, 20), [(255, 0, 0)]),
        "tmp": tmp_path,
        "thin": _labels(tmp_path / "thin.png", (400, 20), [(255, 0, 0)]),
        "read_only": tmp_path / "read-only",
    }
    (tmp_path / "read-only").mkdir(mode=0o555)
    if case == "read-only output folder" and os.access(tmp_path / "read-only", os.W_OK):
        pytest.skip("running as root: no folder is read-only")
    argv = [arg.format(**files) for arg in argv]
    out = tmp_path / "out.png"
    if "-o" not in argv:
        argv += ["-o", str(out)]
    assert main([*argv, *TINY] if argv[0] == "stylize" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cast: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_writes_the_latest_image_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupt_at_step_two(step):
        if step.step == 2:
            raise KeyboardInterrupt

    # the real stylize, interrupted from its callback as Ctrl-C would interrupt it
    monkeypatch.setattr(
        cli, "stylize", functools.partial(cli.stylize, callback=interrupt_at_step_two)
    )
    out = tmp_path / "out.png"
    assert (
        main(
            ["stylize", CONTENT, STYLE, "-o", str(out), *TINY[:2], "--iters", "5", "--scales", "1"]
        )
        == 130
    )
    assert images.load_image(out).shape == (3, 30, 40)
    assert capsys.readouterr().err.endswith(f"cast: interrupted; the latest image is in '{out}'\n")


def test_ctrl_c_before_any_image_does_not_point_at_an_old_file(tmp_path, monkeypatch, capsys):
    def interrupt_before_any_step(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "stylize", interrupt_before_any_step)
    out = tmp_path / "out.png"
    out.write_bytes(b"from an earlier run")
    assert main(["stylize", CONTENT, STYLE, "-o", str(out), *TINY]) == 130
    assert capsys.readouterr().err == "cast: interrupted\n"
