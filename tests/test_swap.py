"""``cast swap``: two photos exchange the look of paired regions, the rest keeps its own."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cast
from cast import images
from cast.cli import main
from cast.errors import CastError
from cast.masks import soft_masks
from cast.memory import Plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
A, B = EXAMPLES / "tubingen.jpg", EXAMPLES / "hoovertowernight.jpg"
RUN = ["--size", "64", "--scales", "1", "--iters", "20", "--quiet"]

pytestmark = pytest.mark.slow


def _top_band(path: Path, image: Path, colours) -> str:
    """A label image of ``image``'s shape: the top third ``colours[0]``, the rest ``colours[1]``."""
    h, w = images.image_size(image)
    labels = np.zeros((h, w, 3), np.uint8)
    labels[: h // 3], labels[h // 3 :] = colours
    Image.fromarray(labels).save(path)
    return str(path)


def test_paired_regions_exchange_their_look_and_the_rest_keeps_it(tmp_path):
    # red pairs; the blue and green rests pair with nothing
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 0, 0), (0, 0, 255)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 0, 0), (0, 255, 0)])
    out = [tmp_path / "a_out.png", tmp_path / "b_out.png"]
    argv = ["swap", str(A), str(B), "--mask-a", mask_a, "--mask-b", mask_b, "-o", *map(str, out)]
    assert main([*argv, *RUN]) == 0
    for own, other, result in [(A, B, out[0]), (B, A, out[1])]:
        before, lender = images.load_image(own, 64), images.load_image(other, 64)
        after = images.load_image(result)
        top = before.shape[1] // 3
        # the exchanged band's colour moves towards the other photo's band
        band = [image[:, :top].mean((1, 2)) for image in (before, after, lender)]
        assert (band[1] - band[2]).norm() < 0.98 * (band[0] - band[2]).norm(), own.name
        # the rest (8 px clear of the border) changes far less than the band
        change = (after - before).abs().mean(0)
        assert change[top + 8 :].mean() < change[:top].mean() / 2, own.name


def test_soft_masks_exchange_the_white_part_only(tmp_path, monkeypatch):
    module = sys.modules["cast.swap"]  # the package's ``swap`` is the function
    calls = []
    monkeypatch.setattr(module, "stylize", lambda *args, **kwargs: calls.append((args, kwargs)))
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    module.swap(A, B, mask_a, mask_b)

    def grey(mask, photo):  # at the size the run gives the photo: stylize's default, 512 px
        return soft_masks([mask], images.fit(images.image_size(photo), 512))[0]

    for (content, _), options in calls:
        other = B if content == A else A
        white = grey(mask_a if content == A else mask_b, content)
        lender = grey(mask_b if content == A else mask_a, other)
        regions, (style_regions,) = options["content_mask"], options["style_masks"]
        # A: white exchanged, the rest kept; B lends its white part only
        assert torch.equal(regions[0], white) and torch.equal(regions[1], 1 - white)
        assert torch.equal(style_regions[0], lender) and style_regions[1].max() == 0
    # the second run's dry run (its refusals), then the two runs
    assert [call[0] for call in calls] == [(B, A), (A, B), (B, A)]
    assert [call[1].get("dry_run", False) for call in calls] == [True, False, False]


def test_a_dry_run_swap_prints_nothing(tmp_path, capsys):
    # swap(..., dry_run=True) announced the two runs it did not make
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    plans = cast.swap(A, B, mask_a, mask_b, size=40, scales=1, dry_run=True)
    assert all(isinstance(plan, Plan) for plan in plans)
    assert capsys.readouterr() == ("", "")


def test_cast_swap_dry_run_prints_both_plans_and_writes_nothing(tmp_path, capsys):
    # cast swap had no --dry-run (cast stylize and cast.swap do)
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 0, 0), (0, 0, 255)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 0, 0), (0, 255, 0)])
    out = [tmp_path / "a_out.png", tmp_path / "b_out.png"]
    argv = ["swap", str(A), str(B), "--mask-a", mask_a, "--mask-b", mask_b, "-o", *map(str, out)]
    assert main([*argv, *RUN, "--dry-run"]) == 0
    shown = capsys.readouterr()
    plan = (r"plan: \d+x\d+ on \S+ whole, L-BFGS history \d+, "
            r"about [\d.]+ [KMG]iB( of [\d.]+ [KMG]iB free)?\n")  # fmt: skip
    assert re.fullmatch(
        f"swap: '{re.escape(str(A))}' in the look of '{re.escape(str(B))}'\n{plan}"
        f"swap: '{re.escape(str(B))}' in the look of '{re.escape(str(A))}'\n{plan}",
        shown.out,
    ), shown.out
    assert shown.err == "" and not any(o.exists() for o in out)
    # photo B truncated: refused as the run refuses it, one line, nothing written
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(B.read_bytes()[: B.stat().st_size // 2])
    argv[2] = str(truncated)
    assert main([*argv, *RUN, "--dry-run"]) == 2
    shown = capsys.readouterr()
    assert shown.out == "" and shown.err.startswith("cast: error: ") and shown.err.count("\n") == 1
    assert "truncated" in shown.err and not any(o.exists() for o in out)


def test_masks_of_two_kinds_are_one_line_exit_2(tmp_path, capsys):
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 0, 0), (0, 0, 255)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    out = [tmp_path / "a_out.png", tmp_path / "b_out.png"]
    argv = ["swap", str(A), str(B), "--mask-a", mask_a, "--mask-b", mask_b, "-o", *map(str, out)]
    assert main([*argv, *RUN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cast: error: give both swap masks as") and err.count("\n") == 1
    assert not any(o.exists() for o in out)


def test_an_output_naming_the_init_image_is_refused_before_either_run(tmp_path, capsys):
    # OUT_B checked only by the second run: A's result was written, then the command failed
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    init = tmp_path / "init.png"
    init.write_bytes(A.read_bytes())
    out_a = tmp_path / "a_out.png"
    argv = ["swap", str(A), str(B), "--mask-a", mask_a, "--mask-b", mask_b,
            "-o", str(out_a), str(init), "--init", str(init)]  # fmt: skip
    assert main([*argv, "--size", "40", "--scales", "1", "--iters", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cast: error: the output ") and err.count("\n") == 1, err
    assert "is the init image" in err
    assert not out_a.exists() and init.read_bytes() == A.read_bytes()


def test_a_photo_turned_by_exif_takes_a_soft_mask_drawn_over_it_as_shown(tmp_path):
    # its mask was refused against the stored (landscape) size, whichever way it was drawn
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    turned = tmp_path / "turned.jpg"
    Image.open(B).save(turned, exif=exif.tobytes())
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    w, h = Image.open(B).size
    shown = np.zeros((w, h), np.uint8)  # over the photo as shown: h wide, w tall
    shown[: w // 3] = 255
    mask_b = tmp_path / "b.png"
    Image.fromarray(shown).save(mask_b)
    out = [tmp_path / "a_out.png", tmp_path / "b_out.png"]
    argv = ["swap", str(A), str(turned), "--mask-a", mask_a, "--mask-b", str(mask_b),
            "-o", *map(str, out)]  # fmt: skip
    assert main([*argv, "--size", "40", "--scales", "1", "--iters", "1", "--quiet"]) == 0
    assert images.load_image(out[1]).shape == (3, 40, round(40 * h / w))


def test_grey_masks_are_checked_at_the_size_the_runs_use(tmp_path, capsys):
    """swap read grey masks at the photos' full size: one 3.5 % off in aspect, which stylize
    takes at --size 40, was refused there, naming the full size as the size used."""
    h, w = images.image_size(A)  # 288 x 384
    grey = np.zeros((h - 10, w), np.uint8)
    grey[: h // 3] = 255
    Image.fromarray(grey).save(tmp_path / "a.png")
    grey = np.zeros(images.image_size(B), np.uint8)
    grey[: grey.shape[0] // 3] = 255
    Image.fromarray(grey).save(tmp_path / "b.png")
    tiny = ["--size", "40", "--scales", "1", "--iters", "1", "--quiet"]
    out = [tmp_path / "a_out.png", tmp_path / "b_out.png"]
    argv = ["swap", str(A), str(B), "--mask-a", str(tmp_path / "a.png"),
            "--mask-b", str(tmp_path / "b.png"), "-o", *map(str, out)]  # fmt: skip
    stylized = ["stylize", str(A), str(B), "--soft-mask", str(tmp_path / "a.png"),
                "-o", str(tmp_path / "s.png"), *tiny]  # fmt: skip
    assert main(stylized) == 0 and main([*argv, *tiny]) == 0
    assert all(path.exists() for path in out)
    # refused where it is off at the size used, naming that size
    assert main([*argv, "--size", "400", "--scales", "1", "--quiet"]) == 2
    assert "its image is 400x300 (as used)" in capsys.readouterr().err


def test_two_names_of_one_output_file_are_both_named(tmp_path, capsys):
    # a hard link was reported as "both swap outputs are 'a_out.png'": the user gave two names
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    out_a, out_b = tmp_path / "a_out.png", tmp_path / "b_out.png"
    out_a.write_bytes(b"an earlier result")
    out_b.hardlink_to(out_a)
    argv = ["swap", str(A), str(B), "--mask-a", mask_a, "--mask-b", mask_b,
            "-o", str(out_a), str(out_b)]  # fmt: skip
    assert main([*argv, *RUN]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cast: error: the swap outputs '{out_a}' and '{out_b}' are one file; give two "
        "different files\n"
    )
    assert out_a.read_bytes() == b"an earlier result"


def test_photo_b_too_thin_as_content_is_refused_before_either_run(tmp_path, capsys):
    # fine as a style at --style-scale 4, too thin as content: A's result was written, then the
    # second run refused
    thin = tmp_path / "thin.png"
    Image.open(B).convert("RGB").resize((400, 40)).save(thin)
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", thin, [(255, 255, 255), (0, 0, 0)])
    out = [tmp_path / "a_out.png", tmp_path / "b_out.png"]
    argv = ["swap", str(A), str(thin), "--mask-a", mask_a, "--mask-b", mask_b,
            "-o", *map(str, out), "--style-scale", "4"]  # fmt: skip
    assert main([*argv, "--size", "40", "--scales", "1", "--iters", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    # named by its file (the user named no content image) and, at one scale, no --scales advice
    assert err.startswith(f"cast: error: the content image '{thin}' is 40x4 px"), err
    assert err.endswith(": raise --size\n") and err.count("\n") == 1
    assert not any(o.exists() for o in out)


def test_a_label_image_fitting_a_as_content_but_not_as_a_style_is_refused_before_either_run(
    tmp_path, capsys
):
    # 3.5 % too wide: within the aspect check's rounding slack at A's 40x30 as content, beyond
    # it at A's 160x120 as a style (--style-scale 4); the second run's dry run read no masks,
    # so A's result was written and then the second run refused
    h, w = images.image_size(A)
    mask_a = tmp_path / "a.png"
    labels = np.zeros((round(h / 1.035), w, 3), np.uint8)
    labels[: h // 3], labels[h // 3 :] = (255, 0, 0), (0, 0, 255)
    Image.fromarray(labels).save(mask_a)
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 0, 0), (0, 255, 0)])
    out = [tmp_path / "a_out.png", tmp_path / "b_out.png"]
    argv = ["swap", str(A), str(B), "--mask-a", str(mask_a), "--mask-b", mask_b,
            "-o", *map(str, out), "--style-scale", "4"]  # fmt: skip
    assert main([*argv, "--size", "40", "--scales", "1", "--iters", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cast: error: mask '{mask_a}' is {w}x{round(h / 1.035)} but its "
                          "image is 160x120 (as used)"), err  # fmt: skip
    assert err.count("\n") == 1
    assert not any(o.exists() for o in out)


def test_two_spellings_of_one_output_on_a_case_blind_system_are_refused(tmp_path, monkeypatch):
    # Windows' rule (os.path.normcase there folds case): 'x.png' and 'x.PNG' name one file, and
    # B's result would replace A's
    module = sys.modules["cast.swap"]
    monkeypatch.setattr(module, "stylize", lambda *args, **kwargs: None)
    monkeypatch.setattr(os.path, "normcase", str.lower)
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    outputs = (tmp_path / "x.png", tmp_path / "x.PNG")
    with pytest.raises(CastError, match="are one file; give two different files"):
        module.swap(A, B, mask_a, mask_b, outputs)


def test_each_run_says_whose_plan_and_progress_follow(tmp_path, monkeypatch, capsys):
    """Two plan lines and two sets of progress bars: a line before each names the photo being
    styled and the one lending its look (none before the dry run, none with --quiet)."""
    module = sys.modules["cast.swap"]
    monkeypatch.setattr(module, "stylize", lambda *args, **kwargs: None)
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    module.swap(A, B, mask_a, mask_b)
    assert capsys.readouterr().err.splitlines() == [
        f"swap: '{A}' in the look of '{B}'",
        f"swap: '{B}' in the look of '{A}'",
    ]
    module.swap(A, B, mask_a, mask_b, progress=False)
    assert capsys.readouterr().err == ""
    # photos given as tensors (the Python API) are named by their places
    photos = [images.load_image(path) for path in (A, B)]
    module.swap(*photos, mask_a, mask_b)
    assert capsys.readouterr().err.splitlines() == [
        "swap: photo A in the look of photo B",
        "swap: photo B in the look of photo A",
    ]


def test_strict_is_refused_as_swap_keeps_unpaired_regions(tmp_path):
    # strict=True (Python API only) passed the dry run and refused after A's result was
    # written: every colour of A pairs, B's green does not
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 0, 0), (255, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 0, 0), (0, 255, 0)])
    out = (tmp_path / "a_out.png", tmp_path / "b_out.png")
    with pytest.raises(CastError, match="drop strict"):
        sys.modules["cast.swap"].swap(A, B, mask_a, mask_b, out, strict=True, size=40, scales=1,
                                      iters=1, progress=False)
    assert not any(o.exists() for o in out)


def test_two_spellings_of_one_output_in_a_case_blind_folder_are_refused(tmp_path, monkeypatch):
    """On a case-blind folder (macOS's default) x.png and X.PNG are one file, which POSIX's
    normcase cannot tell: swap asks the folder before either run (it used to find out only
    once A's result was written)."""
    module = sys.modules["cast.swap"]
    monkeypatch.setattr(module, "stylize", lambda *args, **kwargs: None)
    mask_a = _top_band(tmp_path / "a.png", A, [(255, 255, 255), (0, 0, 0)])
    mask_b = _top_band(tmp_path / "b.png", B, [(255, 255, 255), (0, 0, 0)])
    out = (tmp_path / "x.png", tmp_path / "X.PNG")
    assert not module._case_blind(str(tmp_path))  # this machine's folders tell case apart
    module.swap(A, B, mask_a, mask_b, out, progress=False)
    monkeypatch.setattr(module, "_case_blind", lambda folder: folder == str(tmp_path))
    with pytest.raises(CastError, match="are one file; give two different files"):
        module.swap(A, B, mask_a, mask_b, out, progress=False)
    # other folders, or names that differ by more than case, are asked nothing
    module.swap(A, B, mask_a, mask_b, (tmp_path / "x.png", tmp_path / "y.PNG"), progress=False)
    assert not any(tmp_path.glob(".cast-case-*"))  # the probe leaves nothing behind
