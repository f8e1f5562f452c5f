"""The ``cast`` command: a tiny real run, and bad input as one line with exit status 2."""

from __future__ import annotations

import functools
import inspect
import io
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cast import cli, images
from cast.cli import main
from cast.stylize import stylize
from cast.weights import conv_shapes

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


def test_mask_says_what_it_mattes_before_it_starts(tmp_path, capsys):
    """Scribbles on a 1024x768 photo matted 17 s without a word: every pixel but the strokes is
    unknown. Now one line says how many and about how long; -q drops it."""
    scribbles = np.full((36, 48), 128, np.uint8)
    scribbles[3:6, 5:40], scribbles[30:33, 5:45] = 255, 0
    Image.fromarray(scribbles).save(tmp_path / "scribbles.png")
    argv = ["mask", CONTENT, str(tmp_path / "scribbles.png"), "-o", str(tmp_path / "m.png")]
    assert main([*argv, "--size", "48"]) == 0
    unknown = 36 * 48 - 35 * 3 - 40 * 3
    said = capsys.readouterr().err
    assert said == f"matting {unknown:,} unknown pixels at 48x36: up to about 1 s\n"
    assert main([*argv, "--size", "48", "-q"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_mask_prints_nothing_on_stdout(tmp_path, capsys):
    """pymatting printed a five-line PERFORMANCE WARNING on stdout, in the way of a pipe, when
    its preconditioner took a second try (5 s: these scribbles on the 384x288 tubingen)."""
    scribbles = np.full((288, 384), 128, np.uint8)
    scribbles[30:34, 50:340], scribbles[225:229, 13:375], scribbles[150:154, 225:375] = 255, 0, 0
    Image.fromarray(scribbles).save(tmp_path / "scribbles.png")
    argv = ["mask", CONTENT, str(tmp_path / "scribbles.png"), "-o", str(tmp_path / "m.png"), "-q"]
    assert main(argv) == 0
    assert capsys.readouterr() == ("", "")


def test_mask_warns_in_one_line_of_strokes_lost_in_resizing(tmp_path, capsys):
    """Thin scribbles shrunk to the mask's size lost most of their pixels without a word."""
    scribbles = np.full((288, 384), 128, np.uint8)
    scribbles[20:40, 20:360], scribbles[250:262, 100:200] = 255, 0
    scribbles[150, 10:370] = scribbles[200, 10:370] = 0  # 1 px: between the rows kept
    Image.fromarray(scribbles).save(tmp_path / "scribbles.png")
    argv = ["mask", CONTENT, str(tmp_path / "scribbles.png"), "-o", str(tmp_path / "m.png")]
    assert main([*argv, "--size", "48"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        f"cast: warning: trimap '{tmp_path / 'scribbles.png'}': 38% of the black strokes' pixels "
        "vanish at the mask's 48x36 (strokes thinner than 8 px fall between the pixels kept); "
        "draw them thicker or make the mask larger"
    ]


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


@pytest.mark.parametrize("command", ["stylize", "swap"])
def test_help_explains_the_kernel_presets_it_points_to(command, capsys):
    """--high-order says "(see below)": below, every command lists the presets."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    assert "(see below)" in shown and "neighbours8 J=5" in shown


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
    # PIL wrote them, the result shrunk to an icon (ICO: 256 px at most) or squashed (ICNS)
    "icon output": (["stylize", CONTENT, STYLE, "-o", "{tmp}/out.ico"], "ICO holds icons of"),
    "mask to an icon": (["mask", CONTENT, "{square}", "-o", "{tmp}/out.icns"], "ICNS holds"),
    "read-only output folder": (
        ["stylize", CONTENT, STYLE, "-o", "{read_only}/out.png"],
        "is not writable",
    ),
    "soft masks with style masks": (
        ["stylize", CONTENT, STYLE, "--soft-mask", "{square}", "--style-mask", "{one}"],
        "soft masks cannot pair with style masks",
    ),
    "unknown device": (["stylize", CONTENT, STYLE, "--device", "gpu"], "unknown device 'gpu'"),
    # from the header, before the weights load (these are missing)
    "too thin an image": (
        ["stylize", "{thin}", STYLE, "--model", "{tmp}/missing.pth"],
        "thin.png' is 40x2 px at the coarsest scale",
    ),
    "tile off the stride": (
        ["stylize", CONTENT, STYLE, "--tile", "40"],
        "multiple of the network's",
    ),
    "negative tile": (["stylize", CONTENT, STYLE, "--tile", "-16"], "--tile must be"),
    "tile below the stride": (["stylize", CONTENT, STYLE, "--tile", "8"], "stride (16 px), got 8"),
    "torchrun environment half-set": (
        ["stylize", CONTENT, STYLE],
        "RANK set but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT: launch with torchrun",
    ),
    "mask of a missing image": (["mask", "nowhere.jpg", "{square}"], "cannot read image"),
    **{
        f"{flag} {value}": (["stylize", CONTENT, STYLE, f"{flag}={value}"], f"{flag} must be")
        for flag in ("--content-weight", "--style-weight", "--tv-weight", "--lr")
        for value in ("nan", "inf", "-inf", "-1", "1e308")
    },
    "--lr 0": (["stylize", CONTENT, STYLE, "--lr", "0"], "--lr must be positive, got 0.0"),
    "adam --lr nan": (["stylize", CONTENT, STYLE, "--optimizer", "adam", "--lr", "nan"], "lr must"),
    "huge seed": (["stylize", CONTENT, STYLE, "--seed", "9" * 23], "--seed must be at most"),
    "negative seed": (["stylize", CONTENT, STYLE, "--seed", "-1"], "--seed must be 0 or more"),
    "mps device": (["stylize", CONTENT, STYLE, "--device", "mps"], "device mps is not supported"),
    "xpu device": (["stylize", CONTENT, STYLE, "--device", "xpu"], "device xpu is not supported"),
    "unknown CAST_BACKEND": (["stylize", CONTENT, STYLE], "CAST_BACKEND='xyz' is not a backend"),
    "kernel file of 3e38": (["stylize", CONTENT, STYLE, "--high-order", "{huge}"], "values up to"),
    "sparse kernel file": (["stylize", CONTENT, STYLE, "--high-order", "{sparse}"], "floating"),
    "NaN float image": (["stylize", "{nan_tiff}", STYLE], "NaN or infinite pixels"),
    "NaN soft mask": (["stylize", CONTENT, STYLE, "--soft-mask", "{nan_tiff}"], "NaN or infinite"),
    "negative float image": (["stylize", "{negative_tiff}", STYLE], "must lie in [0, 1]"),
    "weights whose bias is a list": (
        ["stylize", CONTENT, STYLE, "--model", "{list_bias}"],
        "are not all float tensors",
    ),
    # found before the weights load (these are missing), not after the run
    **{
        case: (["stylize", CONTENT, STYLE, "--model", "{tmp}/missing.pth", "-o", out], message)
        for case, out, message in (
            ("output is a directory", "{tmp}/folder.png", "it is a directory"),
            ("output name too long", "{tmp}/" + "x" * 246 + ".png", "File name too long"),
            ("output in /proc", "/proc/x.png", "cannot write '/proc/x.png'"),
            ("output is a named pipe", "{tmp}/pipe.png", "it is not a regular file"),
        )
    },
    "mask output is a directory": (
        ["mask", CONTENT, "{square}", "-o", "{tmp}/folder.png"],
        "a directory",
    ),
    "mask larger than its image": (
        ["mask", CONTENT, "{square}", "-o", "{tmp}/alpha.png", "--size", "100000"],
        "--size must be at most 384",
    ),
    "mask of size 0": (["mask", CONTENT, "{square}", "--size", "0"], "--size must be positive"),
    "mask to a format PIL cannot write": (
        ["mask", CONTENT, "{square}", "-o", "{tmp}/alpha.psd"],
        "not an image format PIL writes",
    ),
}


# the environment a case runs in
ENVIRONMENTS = {
    "unknown CAST_BACKEND": {"CAST_BACKEND": "xyz"},
    "torchrun environment half-set": {"RANK": "0"},
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_output(case, tmp_path, capsys, monkeypatch):
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
    np.save(tmp_path / "huge.npy", np.full((1, 3, 3), 3e38, np.float32))
    torch.save(torch.eye(3)[None].to_sparse(), tmp_path / "sparse.pt")
    nan = np.full((30, 40), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tiff")
    Image.fromarray(np.full((30, 40), -0.5, np.float32)).save(tmp_path / "negative.tiff")
    vgg16 = {}
    for i, shape in enumerate(conv_shapes("vgg16")):
        vgg16[f"features.{i}.weight"] = torch.zeros(1, 1, 1, 1)  # the right count of convs
        vgg16[f"features.{i}.bias"] = [0.0] * shape[0]
    torch.save(vgg16, tmp_path / "list_bias.pth")
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    files |= {
        "huge": tmp_path / "huge.npy",
        "sparse": tmp_path / "sparse.pt",
        "nan_tiff": tmp_path / "nan.tiff",
        "negative_tiff": tmp_path / "negative.tiff",
        "list_bias": tmp_path / "list_bias.pth",
    }
    for name, value in ENVIRONMENTS.get(case, {}).items():
        monkeypatch.setenv(name, value)
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


def test_a_truncated_init_image_is_named_the_init_image(tmp_path, capsys):
    # its header reads, its pixels do not: the error called it "image '...'"
    cut = tmp_path / "start.jpg"
    cut.write_bytes(Path(CONTENT).read_bytes()[:2000])
    out = tmp_path / "out.png"
    assert main(["stylize", CONTENT, STYLE, "--init", str(cut), "-o", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cast: error: cannot read init image '{cut}': ") and err.count("\n") == 1
    assert not out.exists()


def test_a_kernel_text_file_without_numbers_is_one_line_and_no_warning(tmp_path, capsys):
    # numpy's warning about the empty file printed two lines of its own before the error
    (tmp_path / "kernels.txt").write_text("# J blocks of r rows, to be filled in\n")
    argv = ["stylize", CONTENT, STYLE, "--high-order", str(tmp_path / "kernels.txt")]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert main([*argv, "-o", str(tmp_path / "out.png"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cast: error: ") and err.count("\n") == 1, err
    assert "kernels.txt" in err and [str(w.message) for w in shown] == []


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


SAME = {
    "content": (["stylize", "{same}", STYLE], "the content image"),
    "style": (["stylize", CONTENT, STYLE, "{same}"], "the style image 2"),
    "content mask": (["stylize", CONTENT, STYLE, "--content-mask", "{same}"], "the content mask"),
    "soft mask": (["stylize", CONTENT, STYLE, "--soft-mask", "{same}"], "the soft mask 1"),
    "mask's image": (["mask", "{same}", "{trimap}"], "the image"),
    "mask's trimap": (["mask", CONTENT, "{same}"], "the trimap"),
}


@pytest.mark.parametrize("case", SAME, ids=list(SAME))
def test_an_output_naming_an_input_is_refused_and_the_input_kept(case, tmp_path, capsys):
    argv, message = SAME[case]
    same = tmp_path / "same.jpg"
    same.write_bytes(Path(CONTENT).read_bytes())
    trimap = tmp_path / "trimap.png"
    Image.fromarray(np.full((30, 40), 128, np.uint8)).save(trimap)
    # through a symbolic link, so only the same-file test can tell
    (tmp_path / "link.jpg").symlink_to(same)
    argv = [arg.format(same=same, trimap=trimap) for arg in argv] + [
        "-o",
        str(tmp_path / "link.jpg"),
    ]
    assert main([*argv, *TINY] if argv[0] == "stylize" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cast: error: the output ") and err.count("\n") == 1, err
    assert message in err and "choose another output path" in err
    assert same.read_bytes() == Path(CONTENT).read_bytes()


@pytest.mark.slow
def test_sigterm_writes_the_latest_image_and_exits_143(tmp_path, monkeypatch, capsys):
    def terminate_at_step_two(step):
        if step.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(
        cli, "stylize", functools.partial(cli.stylize, callback=terminate_at_step_two)
    )
    out = tmp_path / "out.png"
    argv = ["stylize", CONTENT, STYLE, "-o", str(out), *TINY[:2], "--iters", "5", "--scales", "1"]
    assert main(argv) == 143
    assert images.load_image(out).shape == (3, 30, 40)
    assert capsys.readouterr().err.endswith(f"cast: terminated; the latest image is in '{out}'\n")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


@pytest.mark.slow
def test_a_signal_during_a_save_leaves_the_file_whole_and_no_temporary(
    tmp_path, monkeypatch, capsys
):
    original = Image.Image.save

    def save_and_get_killed(picture, file, *args, **kwargs):
        if not isinstance(file, io.BytesIO):  # not the format probe: a save of the image
            os.kill(os.getpid(), signal.SIGTERM)  # mid-save, as `kill` would
        return original(picture, file, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_and_get_killed)
    out = tmp_path / "out.png"
    argv = ["stylize", CONTENT, STYLE, "-o", str(out), *TINY, "--save-every", "1"]
    # killed in the save of step 1, then again in the save of the latest image
    assert main(argv) == 143
    assert capsys.readouterr().err.endswith(f"the latest image is in '{out}'\n")
    assert images.load_image(out).shape == (3, 30, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.parametrize(
    "argv",
    [["stylize", CONTENT], ["stylize", CONTENT, STYLE, "-o", "x.png", "--size", "big"],
     ["stylize", CONTENT, STYLE, "-o", "x.png", "--lr", "-inf"], ["paint"], []],
    ids=["no style", "size not a number", "negative number as a value", "unknown command", "none"],
)  # fmt: skip
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("cast: error: ") and err.count("\n") == 1
    assert "--help'" in err


def test_a_process_alone_prints_its_error_whatever_its_local_rank(tmp_path, monkeypatch, capsys):
    """Without torchrun's RANK a process runs alone, but a LOCAL_RANK left in its environment
    (another launcher's, a parent's) made it leave its errors to another rank: nothing was
    printed, and it exited 2 after a wait."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    missing = str(tmp_path / "missing.jpg")
    assert main(["stylize", missing, STYLE, "-o", str(tmp_path / "out.png")]) == 2
    assert capsys.readouterr().err.startswith(f"cast: error: cannot read image '{missing}'")
    with pytest.raises(SystemExit):  # the command's own errors too
        main(["stylize", missing, STYLE, "-o", str(tmp_path / "out.png"), "--iters", "x"])
    assert capsys.readouterr().err.startswith("cast: error: argument --iters")


def test_after_the_run_a_second_signal_ends_the_process_without_python(monkeypatch, capsys):
    # the `cast` command: once main() is done, Ctrl-C or SIGTERM during the interpreter's exit
    # (atexit handlers) must not raise KeyboardInterrupt into them (a traceback)
    monkeypatch.setattr("sys.argv", ["cast", "stylize", "nowhere.jpg", STYLE, "-o", "x.png"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == 2
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_mask_options_take_one_file_each_so_a_style_is_never_a_mask(tmp_path, capsys):
    argv = ["stylize", CONTENT, "a.jpg", "b.jpg", "--soft-mask", "sky.png", "--soft-mask",
            "town.png", "--style-mask", "-", "--style-mask", "b.png", "-o", "x.png"]  # fmt: skip
    args = cli._parser().parse_args(argv)
    assert args.styles == ["a.jpg", "b.jpg"] and args.soft_mask == ["sky.png", "town.png"]
    assert args.style_mask == ["-", "b.png"]
    # a style image after a mask option used to become a second mask
    with pytest.raises(SystemExit) as exited:
        main(["stylize", CONTENT, STYLE, "--soft-mask", "sky.png", STYLE, "-o", "x.png"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"cast: error: unrecognized arguments: {STYLE}")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["stylize", CONTENT, STYLE, "-o", str(out), "--size", "4096", "--tile", "512"]
    assert main([*argv, "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert re.fullmatch(
        r"plan: 4096x\d+ on \S+ in \d+ tiles of 512 px \(\+24 px halo\), "
        r"L-BFGS history \d+, about [\d.]+ [GM]iB( of [\d.]+ [GM]iB free)?\n",
        shown,
    )
    assert not out.exists()


@pytest.mark.parametrize("masks", ["colour soft mask", "other aspect", "empty region"])
def test_dry_run_refuses_the_masks_the_run_refuses(masks, tmp_path, capsys):
    """The dry run read no masks: it printed the plan for masks the run then refused."""
    black = np.zeros((30, 40), np.uint8)
    Image.fromarray(black).save(tmp_path / "black.png")  # its white region is empty
    options = {
        "colour soft mask": ["--soft-mask", CONTENT],
        "other aspect": ["--content-mask", str(EXAMPLES / "hoovertowernight_trimap.png")],
        "empty region": ["--soft-mask", str(tmp_path / "black.png")],
    }[masks]
    out = tmp_path / "out.png"
    argv = ["stylize", CONTENT, STYLE, STYLE, *options, "-o", str(out), *TINY]
    assert main(argv) == 2
    refused = capsys.readouterr()
    assert refused.err.startswith("cast: error: ") and refused.err.count("\n") == 1
    assert main([*argv, "--dry-run"]) == 2
    assert capsys.readouterr() == ("", refused.err) and not out.exists()


@pytest.mark.parametrize("which", ["content", "style", "init"])
def test_dry_run_refuses_a_truncated_image_as_the_run_does(which, tmp_path, capsys):
    """The dry run read only the images' headers: a truncated photo got a plan and exit 0."""
    whole = Path(CONTENT if which == "content" else STYLE).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    files = {"content": [str(truncated), STYLE], "style": [CONTENT, str(truncated)],
             "init": [CONTENT, STYLE, "--init", str(truncated)]}[which]  # fmt: skip
    out = tmp_path / "out.png"
    argv = ["stylize", *files, "-o", str(out), *TINY]
    assert main(argv) == 2
    refused = capsys.readouterr()
    assert "truncated" in refused.err and refused.err.count("\n") == 1, refused.err
    assert main([*argv, "--dry-run"]) == 2
    assert capsys.readouterr() == ("", refused.err) and not out.exists()


def test_a_plan_that_cannot_be_printed_is_one_line_exit_2(tmp_path):
    # stdout a full disk (or a pipe its reader closed): print's traceback
    argv = ["stylize", CONTENT, STYLE, "-o", str(tmp_path / "out.png"), "--size", "64", "--dry-run"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "cast", *argv], stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert done.returncode == 2 and done.stderr.startswith("cast: error: "), done.stderr[-500:]
    assert done.stderr.count("\n") == 1 and "No space left on device" in done.stderr


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of ``signum`` installed now."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.parametrize("rank", [None, "0", "1"], ids=["alone", "rank 0", "rank 1"])
def test_sigterm_while_starting_is_one_line_exit_143(rank, tmp_path):
    """SIGTERM while the command still imports torch ended it silently, as if it had crashed
    (-15); torchrun's other ranks stay quiet (torchrun signals every rank)."""
    env = os.environ | {"PYTHONPATH": str(EXAMPLES.parent)}  # this cast, not one installed
    if rank is not None:
        env["RANK"] = rank
    process = subprocess.Popen(
        [sys.executable, "-m", "cast", "stylize", "a.jpg", "b.jpg", "-o", "out.png"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not _catches(process.pid, signal.SIGTERM):  # the start-up's handler, first
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143
    assert stderr == ("" if rank == "1" else "cast: terminated while starting\n")


def test_ctrl_c_while_starting_is_one_line_exit_130(tmp_path):
    """A Ctrl-C while the command still imports torch (about a second) ends it with one line,
    not an import traceback. Several delays, so one of them lands inside the imports."""
    for delay in (0.2, 0.5, 0.9):
        process = subprocess.Popen(
            [sys.executable, "-m", "cast", "stylize", "a.jpg", "b.jpg", "-o", "out.png"],
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONPATH": str(EXAMPLES.parent)},  # this cast, not one installed
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=120)[1]
        assert "Traceback" not in stderr, (delay, stderr[-500:])
        # -SIGINT: the run had already ended (its one line printed) and the signal met run()'s
        # default handler during exit, as it should (a fast machine gets there within 0.9 s).
        assert process.returncode in (2, 130, -signal.SIGINT), (delay, process.returncode, stderr)
        assert len(stderr.strip().splitlines()) == 1, (delay, stderr)
