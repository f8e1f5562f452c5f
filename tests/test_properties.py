"""Properties of bad input, over random numbers, shapes and dtypes: either one line
``cast: error: ...`` with exit status 2 (a ``CastError`` from Python) or a finite result;
never a traceback, and no file changes but OUT.

The network's weights are read once and handed to every run; images are 32 px, one step.
Random tensors are almost never valid, so the API's real run is the ``@example``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cast import cli, images
from cast.errors import CastError
from cast.stylize import stylize
from cast.weights import DEFAULT_MODEL, load_vgg

pytestmark = pytest.mark.slow  # the real weights, read once

FEW = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# numbers as a user types them: nan, inf, negative, huge, not numbers at all
TYPED = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "-0", "1e308", "1e-300", "abc", "", "1,5",
                     "99999999999999999999999", "0x10"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)  # fmt: skip
TINY = ["--size", "32", "--iters", "1", "--scales", "1"]
# options whose valid values keep a real run tiny (they override TINY)
BOUNDED = {
    "--size": st.sampled_from(["32", "40", "31", "0", "-40", "4e1", "nan", "1" * 30]),
    "--iters": st.sampled_from(["0", "1", "-1", "1.5", "x"]),
    "--scales": st.sampled_from(["1", "2", "0", "-1", "99999"]),
    "--save-every": st.sampled_from(["1", "0", "-3", "nan"]),
}
FREE = ["--content-weight", "--style-weight", "--tv-weight", "--lr", "--seed", "--lbfgs-history",
        "--style-scale", "--device", "--high-order", "--init"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Inputs that the runs must leave alone."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name in ("content.png", "style.png", "other.jpg"):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / name)
    (folder / "text.png").write_text("not a picture")
    return folder


@pytest.fixture(scope="module")
def weights():
    return load_vgg(DEFAULT_MODEL)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exited:  # argparse
            code = exited.code
    return code, err.getvalue()


@FEW
@given(
    content=st.sampled_from(["content.png", "missing.png", "text.png", "out.png", "."]),
    styles=st.lists(st.sampled_from(["style.png", "other.jpg", "content.png", "out.png"]),
                    min_size=0, max_size=2),
    out=st.sampled_from(["out.png", "style.png", "out.txt", "sub/out.png", ".", "out.jpg"]),
    bounded=st.fixed_dictionaries({}, optional=BOUNDED),
    free=st.dictionaries(st.sampled_from(FREE), TYPED, max_size=4),
)  # fmt: skip
@example(content="content.png", styles=["style.png"], out="out.png", bounded={},
         free={"--lr": "1e6", "--tv-weight": "0"})  # fmt: skip
def test_the_command_gives_one_line_or_a_result_and_touches_only_out(
    folder, weights, content, styles, out, bounded, free, monkeypatch
):
    monkeypatch.chdir(folder)

    def with_weights_read(*args, model, **kwargs):  # the real stylize, weights not read again
        return stylize(*args, model=weights if model == DEFAULT_MODEL else model, **kwargs)

    monkeypatch.setattr(cli, "stylize", with_weights_read)
    argv = ["stylize", content, *styles, "-o", out, "-q", *TINY]
    argv += [f"{flag}={value}" for flag, value in (bounded | free).items()]
    before = _snapshot(folder)

    code, err = _run(argv)

    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("cast: error: ") and err.count("\n") == 1, err
    else:
        assert torch.isfinite(images.load_image(folder / out)).all()
    after = _snapshot(folder)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    wrote = code == 0 or "the last good image is in" in err
    assert changed <= ({Path(out).name} if wrote else set()), changed
    for name in after.keys() - before.keys():
        (folder / name).unlink()


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
CHANNELS = st.sampled_from([1, 3, 4])
DTYPES = st.sampled_from([torch.float16, torch.float32, torch.float64, torch.int64, torch.bool])


@st.composite
def tensors(draw, channels=CHANNELS):
    """Any rank 1-4, small sides (0 included), any dtype; random values or one repeated
    value (NaN, inf, huge, negative...)."""
    rank = draw(st.integers(1, 4))
    shape = [draw(channels)] + [draw(st.sampled_from([0, 1, 7, 33])) for _ in range(rank - 1)]
    dtype = draw(DTYPES)
    fill = draw(st.one_of(st.none(), FLOATS))
    values = torch.rand(shape, dtype=torch.float64) if fill is None else torch.full(shape, fill)
    return values.to(dtype) if dtype is not torch.bool else values > 0.5


@FEW
@given(content=tensors(), style=tensors(), mask=st.one_of(st.none(), tensors(st.integers(0, 3))),
       weight=FLOATS)  # fmt: skip
@example(content=torch.rand(3, 33, 40), style=torch.rand(3, 20, 33), mask=None, weight=1.0)
def test_the_api_refuses_bad_tensors_with_a_cast_error_or_gives_a_finite_image(
    weights, content, style, mask, weight
):
    run = dict(size=32, scales=1, iters=1, progress=False, content_mask=mask, style_weight=weight)
    try:
        result = stylize(content, style, model=weights, **run)
    except CastError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert torch.isfinite(result).all() and result.shape[0] == 3
