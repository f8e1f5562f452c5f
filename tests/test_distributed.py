"""Sharding on torch.distributed (gloo, CPU processes on this machine): two processes give one
process's image, and a rank that dies makes the other stop with one line."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cast import cli, images
from cast.cli import main
from cast.distributed import BLOCKING_WAIT, Shard, join
from cast.errors import CastError
from cast.memory import plan_memory
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures
from cast.stylize import stylize

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONTENT, STYLE = str(EXAMPLES / "tubingen.jpg"), str(EXAMPLES / "starry_night.jpg")
RUN = dict(size=64, scales=1, tile=32, progress=False, device="cpu")  # 2 x 2 tiles

pytestmark = pytest.mark.slow

RANK_SCRIPT = """
import os, sys, tempfile, torch
sys.path.insert(0, {tests!r})
from open_files import open_files
from cast.stylize import stylize
tempfile.tempdir = spill = sys.argv[2]  # where spilled state goes
held = []  # spill files this rank holds open after each step
image = stylize({content!r}, {style!r}, iters=3, **{run!r},
                callback=lambda step: held.append(len(open_files(spill))))
torch.save((image, held), sys.argv[1] + "." + os.environ["RANK"])
"""


def _torchrun(script: Path, *args) -> None:
    """``script *args`` on two ranks under torchrun; every rank must exit 0."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", "2", str(script), *map(str, args)]  # fmt: skip
    env = os.environ | {"CAST_DIST_TIMEOUT": "60",  # a rank that hangs fails the test sooner
                        "PYTHONPATH": str(EXAMPLES.parent)}  # this cast, not one installed
    done = subprocess.run(launch, timeout=300, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _two_ranks(tmp_path, run: dict) -> tuple:
    """``stylize(iters=3, **run)`` on two gloo ranks under torchrun: their image and, per rank,
    how many files it held open in ``tmp_path / "spill"`` after each step (spilled state)."""
    (tmp_path / "spill").mkdir(parents=True)
    script = tmp_path / "rank.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(RANK_SCRIPT.format(content=CONTENT, style=STYLE, run=run, tests=tests))
    _torchrun(script, tmp_path / "image", tmp_path / "spill")
    (rank0, held0), (rank1, held1) = (torch.load(tmp_path / f"image.{rank}") for rank in (0, 1))
    assert torch.equal(rank0, rank1)  # every rank stepped identically
    return rank0, (held0, held1)


def test_two_gloo_processes_give_the_image_of_one(tmp_path):
    image, _ = _two_ranks(tmp_path, RUN)
    alone = stylize(CONTENT, STYLE, iters=3, **RUN)
    # the ranks add their tiles' sums in another order than one process: float32 rounding
    assert (image - alone).abs().max() <= 1e-4


def test_two_gloo_processes_with_the_state_on_disk_give_their_image_in_memory(tmp_path):
    """Bit for bit: the same ranks, tiles and sums, the state read from files instead of RAM."""
    run = RUN | dict(optimizer="adam")  # the spilled run's optimiser
    image, held = _two_ranks(tmp_path / "disk", run | dict(spill=True))
    assert all(min(rank) >= 5 for rank in held), held  # each rank's state was on disk
    # unnamed files: nothing left behind (torch's first custom op call makes its compile cache
    # directory in tempfile's directory, which the ranks point at the spill directory)
    assert [name for name in os.listdir(tmp_path / "disk" / "spill")
            if not name.startswith("torchinductor")] == []  # fmt: skip
    in_memory, _ = _two_ranks(tmp_path / "ram", run | dict(spill=False))
    # (one process gives another image by more than rounding here: Adam's first steps move
    # each pixel by about lr * sign(gradient), and the ranks' sums round differently)
    assert torch.equal(image, in_memory)


CALLERS_SCRIPT = """
import sys, torch, torch.distributed as dist
from cast.stylize import stylize
dist.init_process_group("gloo")  # the caller's pipeline
first, second = (stylize({content!r}, {style!r}, iters=3, **{run!r}) for _ in range(2))
assert dist.is_initialized()
total = torch.ones(1)
dist.all_reduce(total)  # the caller's group still carries their collectives
torch.save((first, second, total.item()), sys.argv[1] + "." + str(dist.get_rank()))
"""


def test_a_callers_process_group_is_used_and_left_as_it_was(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(CALLERS_SCRIPT.format(content=CONTENT, style=STYLE, run=RUN))
    _torchrun(script, tmp_path / "images")
    ranks = [torch.load(tmp_path / f"images.{rank}") for rank in (0, 1)]
    assert [total for *_, total in ranks] == [2, 2]
    ours, _ = _two_ranks(tmp_path / "ours", RUN)
    # the same tiles and sums in the caller's group as in CAST's, call after call, rank by rank
    assert all(torch.equal(image, ours) for *images, _ in ranks for image in images)


CALLS_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from cast.stylize import stylize
images = []
for _ in range(3):
    images.append(stylize({content!r}, {style!r}, iters=1, **{run!r}))
    assert not dist.is_initialized()  # each call's group is its own, gone at its end
torch.save(images, sys.argv[1] + "." + os.environ["RANK"])
"""


def test_consecutive_calls_under_torchrun_each_make_a_group_of_their_own(tmp_path):
    """torchrun's store outlives the groups: the second failed (keys of the first group)."""
    script = tmp_path / "rank.py"
    script.write_text(CALLS_SCRIPT.format(content=CONTENT, style=STYLE, run=RUN))
    _torchrun(script, tmp_path / "images")
    images = [image for rank in (0, 1) for image in torch.load(tmp_path / f"images.{rank}")]
    assert all(torch.equal(image, images[0]) for image in images)


@pytest.fixture
def callers_group(tmp_path):
    """A process group of one gloo rank that the caller initialised; a factory of it."""

    def initialise(backend="gloo"):
        dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)  # fmt: skip

    yield initialise
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_callers_group_that_torchrun_disagrees_with_is_one_line(callers_group, monkeypatch):
    callers_group()
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with pytest.raises(CastError, match="^the process group has world size 1 but WORLD_SIZE=2: "):
        stylize(CONTENT, STYLE, iters=0, **RUN)
    assert dist.is_initialized()


def test_a_callers_group_that_cannot_carry_the_devices_tensors_is_one_line(
    callers_group, monkeypatch
):
    callers_group("cuda:gloo")  # no backend for CPU tensors, as NCCL's
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)  # as if a second rank had joined
    refusal = (r"^the process group's backend \(cuda:gloo\) cannot all-reduce cpu tensors: "
               r"initialise it with init_process_group\('cpu:gloo,cuda:nccl'\), which carries "
               r"both, or run stylize on cuda$")  # fmt: skip
    with pytest.raises(CastError, match=refusal):
        stylize(CONTENT, STYLE, iters=0, **RUN)
    assert dist.is_initialized()


def test_a_shard_in_a_callers_group_knows_it(callers_group, monkeypatch):
    callers_group()
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)  # as if a second rank had joined
    with join(torch.device("cpu")) as (shard, _):
        assert shard == Shard(0, 2, callers_group=True)
    assert dist.is_initialized()


@pytest.mark.parametrize("callers", [None, "0"])
def test_a_group_cast_makes_on_a_gpu_leaves_the_environment_and_current_device(
    callers, monkeypatch
):
    """No GPU here: torch's CUDA and group calls stand in, recording what join asks of them."""
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(BLOCKING_WAIT, raising=False)
    if callers is not None:
        monkeypatch.setenv(BLOCKING_WAIT, callers)
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # the caller's
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))

    def make_group(backend, **_):  # and the variable as NCCL's constructor would read it
        calls.append((backend, os.environ.get(BLOCKING_WAIT)))

    monkeypatch.setattr(dist, "init_process_group", make_group)
    monkeypatch.setattr(dist, "rendezvous", lambda *_, **__: iter([(dist.HashStore(), 1, 2)]))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroyed"))
    with join(torch.device("cuda")) as (shard, device):
        assert (shard, device) == (Shard(1, 2), torch.device("cuda", 1))
        # blocking waits while the group is made (so that timeouts raise), unless the caller chose
        assert calls == [torch.device("cuda", 1), ("nccl", callers or "1")]
    assert calls[2:] == ["destroyed", 3]
    assert os.environ.get(BLOCKING_WAIT) == callers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _two_stepping_ranks(out: Path) -> Iterator[list[subprocess.Popen]]:
    """Two ranks of a long ``cast stylize`` run (their stderr piped), once rank 0 has written
    its first image to ``out``; both killed at the end."""
    env = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()), "CAST_DIST_TIMEOUT": "30",
                        "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "cast", "stylize", CONTENT, STYLE, "-o", str(out), "--size",
            "96", "--scales", "1", "--tile", "32", "--iters", "1000", "--save-every", "1",
            "--device", "cpu", "-q"]  # fmt: skip
    ranks = [subprocess.Popen(argv, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not out.exists():  # rank 0 writes after every step
            assert time.monotonic() < deadline and ranks[0].poll() is None, "no step was made"
            time.sleep(0.2)
        yield ranks
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_rank_makes_the_other_stop_with_one_line(killed, tmp_path):
    # rank 1 losing contact is its own error: it says so, though rank 0 prints the others
    out = tmp_path / "out.png"
    left = 1 - killed
    with _two_stepping_ranks(out) as ranks:
        ranks[killed].kill()
        killed_at = time.monotonic()
        err = ranks[left].communicate(timeout=90)[1]
        assert time.monotonic() - killed_at < 60
    assert ranks[left].returncode == 2
    assert err.startswith(f"cast: error: rank {left} of 2 lost contact"), err
    assert err.count("\n") == 1, err
    assert out.exists()  # the last image survives


def test_a_rank_that_runs_out_of_memory_says_so_itself(tmp_path):
    """Memory is each rank's own: rank 1 out of memory in mid-run was silent (the error was
    left to rank 0, which never met it) and no rank said why the run stopped."""
    out = tmp_path / "out.png"
    with _two_stepping_ranks(out) as ranks:
        # rank 1 may take no more memory than it has now: its next step fails for real (L-BFGS's
        # history grows by a copy of the image each step, up to 50)
        status = Path(f"/proc/{ranks[1].pid}/status").read_text()
        held = int(status.split("VmSize:")[1].split()[0]) * 1024
        resource.prlimit(ranks[1].pid, resource.RLIMIT_AS, (held, held))
        err = ranks[1].communicate(timeout=90)[1]
    assert ranks[1].returncode == 2
    assert err.startswith("cast: error: rank 1: out of memory on cpu though the plan fitted"), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_every_rank_has_rank_0_alone_say_where_the_image_is(signum, tmp_path):
    """torchrun hands Ctrl-C and SIGTERM to every rank: rank 1 said "the latest image is in
    OUT" too, of the file rank 0 wrote."""
    out = tmp_path / "out.png"
    with _two_stepping_ranks(out) as ranks:
        for rank in ranks:
            rank.send_signal(signum)
        errors = [rank.communicate(timeout=90)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [128 + signum] * 2, errors
    stopped = "interrupted" if signum == signal.SIGINT else "terminated"
    assert errors == [f"cast: {stopped}; the latest image is in '{out}'\n", ""]
    assert images.load_image(out).shape == (3, 72, 96)


@pytest.mark.parametrize("callers_group", [False, True])
def test_lost_contact_names_the_timeout_that_ran_out(callers_group, monkeypatch):
    """In the caller's group the caller's timeout ran out, not $CAST_DIST_TIMEOUT."""

    def failed(_):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "all_reduce", failed)
    monkeypatch.setenv("CAST_DIST_TIMEOUT", "45")
    waited = ("your process group's timeout (init_process_group's timeout=)" if callers_group
              else "45.0 s ($CAST_DIST_TIMEOUT)")  # fmt: skip
    with pytest.raises(CastError) as lost:
        Shard(1, 2, callers_group=callers_group).all_reduce(torch.ones(3))
    assert str(lost.value) == (
        "rank 1 of 2 lost contact with the other processes (Connection closed by peer); "
        f"a rank died or hung longer than {waited}; rerun"
    )


def test_a_half_set_torchrun_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CastError, match="RANK, WORLD_SIZE set but not MASTER_ADDR, MASTER_PORT"):
        stylize(CONTENT, STYLE, iters=0, **RUN)


@pytest.mark.parametrize("rank, world", [("2", "2"), ("-1", "2"), ("0", "0")])
def test_a_rank_outside_the_world_is_one_line(rank, world, monkeypatch):
    """RANK=2 of WORLD_SIZE=2 waited for a rendezvous that could never happen, then said
    "rank 2 could not join the other 1" after pages of C++ socket errors; WORLD_SIZE=0 said
    "rank 0 could not join the other -1"."""
    for name, value in dict(RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port()),
                            CAST_DIST_TIMEOUT="5").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with pytest.raises(CastError, match=f"RANK={rank} with WORLD_SIZE={world}: .*torchrun"):
        stylize(CONTENT, STYLE, iters=0, **RUN)


def test_more_processes_than_tiles_is_refused():
    network, cpu = VGGFeatures(), torch.device("cpu")
    plan = dict(content_layers=CONTENT_LAYERS, style_layers=STYLE_LAYERS, style_hws=[(72, 96)],
                device=cpu, optimizer="adam", history=None, halo=96, stride=16)  # fmt: skip
    assert plan_memory(network, hw=(72, 96), tile=32, processes=9, **plan).tiles == 9
    with pytest.raises(CastError, match="10 processes but --tile 32 makes 9 tile"):
        plan_memory(network, hw=(72, 96), tile=32, processes=10, **plan)
    with pytest.raises(CastError, match="2 processes but no tiling makes 1 tile"):
        plan_memory(network, hw=(72, 96), tile=0, processes=2, **plan)
    chosen = plan_memory(network, hw=(720, 960), tile=None, processes=2, **plan)
    assert chosen.tiles >= 2  # the image would fit whole, but two processes need two tiles


def test_more_processes_than_tiles_is_one_line_exit_2_on_every_rank(tmp_path):
    env = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "out.png"
    argv = [sys.executable, "-m", "cast", "stylize", CONTENT, STYLE, "-o", str(out), "--size",
            "64", "--scales", "1", "--tile", "0", "--device", "cpu", "-q"]  # fmt: skip
    ranks = [subprocess.Popen(argv, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], errors
    # every rank plans alike: rank 0 says it for all
    assert errors[0].startswith("cast: error: 2 processes but no tiling makes 1 tile(s)"), errors
    assert errors[0].count("\n") == 1 and errors[1] == "", errors
    assert not out.exists()


def _two_commands(tmp_path, *args: list[str], env: dict | None = None) -> str:
    """``cast stylize`` with ``args[r]`` on rank r of two (same environment otherwise), both
    on this machine; rank 0's one line of stderr, once every rank has exited 2 (rank 1 said
    nothing: the error is every rank's)."""
    env = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "CAST_DIST_TIMEOUT": "60",
                        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"} | (env or {})
    argv = [sys.executable, "-m", "cast", "stylize", "--size", "64", "--scales", "1", "--tile",
            "32", "--device", "cpu", "-q"]  # fmt: skip
    ranks = [subprocess.Popen(argv + rank_args, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True)
             for r, rank_args in enumerate(args)]  # fmt: skip
    errors = [rank.communicate(timeout=240)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], errors
    assert errors[0].startswith("cast: error: ") and errors[0].count("\n") == 1, errors
    assert errors[1] == "", errors
    return errors[0]


def test_ranks_given_other_files_or_arguments_stop_with_one_line(tmp_path):
    """A rank whose photo differed (the same path on another machine) went on silently and
    mixed both problems' sums into one image; one with another --iters or --size made gloo
    abort the other rank (exit 134) or lose contact."""
    flipped = tmp_path / "flipped.jpg"
    images.save_image(images.load_image(CONTENT).flip(-1), flipped)
    out = tmp_path / "out.png"
    error = _two_commands(tmp_path, [CONTENT, STYLE, "-o", str(out), "--iters", "3"],
                          [str(flipped), STYLE, "-o", str(out), "--iters", "3"])  # fmt: skip
    assert "rank 1 was given another content image than rank 0" in error, error
    error = _two_commands(tmp_path, [CONTENT, STYLE, "-o", str(out), "--iters", "3"],
                          [CONTENT, STYLE, "-o", str(out), "--iters", "4"])  # fmt: skip
    assert "rank 1 was given other settings than rank 0" in error, error
    assert not out.exists()


def test_an_error_in_the_files_is_printed_once_not_once_a_rank(tmp_path):
    """Every rank printed "cannot read image" of a missing photo: the same line N times."""
    out = str(tmp_path / "out.png")
    missing = str(tmp_path / "missing.jpg")
    error = _two_commands(tmp_path, [missing, STYLE, "-o", out], [missing, STYLE, "-o", out])
    assert error.startswith(f"cast: error: cannot read image '{missing}'"), error


SLOW_RANK_0 = """
import os, sys, time
from cast import cli
if os.environ["RANK"] == "0":  # as if it saved a large image first: 2.9 s at 4096 px
    printing = cli._print_error
    cli._print_error = lambda error: (time.sleep(5), printing(error))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_under_torchrun_the_silent_rank_waits_until_it_is_stopped(tmp_path):
    """A silent rank exited 3 s after its error, and torchrun stops every rank once one has
    exited: a rank 0 still saving a large image was stopped and its error replaced with
    'terminated'. Under torchrun a silent rank now waits for its agent to stop it."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0)
    missing = str(tmp_path / "missing.jpg")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", "2", str(script), "stylize", missing, STYLE,
              "-o", str(tmp_path / "o.png")]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(EXAMPLES.parent)}
    started = time.monotonic()
    done = subprocess.run(launch, timeout=100, capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert time.monotonic() - started < 60  # stopped by torchrun, not done waiting
    said = [line for line in done.stderr.splitlines() if "cast: error" in line]
    assert said == [f"cast: error: cannot read image '{missing}': no such file; check the path"]


@pytest.mark.parametrize("rank, local_rank, said", [
    ("1", "1", ""),  # the first rank of its machine says it
    ("1", "0", "cast: error: rank 1: cannot read image"),  # another machine's: its files
    ("1", None, ""),  # no LOCAL_RANK (a launch by hand): rank 0 says it
])  # fmt: skip
def test_an_error_in_the_files_is_said_by_the_first_rank_of_each_machine(
    rank, local_rank, said, tmp_path, monkeypatch, capsys
):
    for name, value in dict(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    # A silent rank waits before it exits: torchrun stops every rank 0.1 s after one exits,
    # which could stop the rank that prints before it does.
    monkeypatch.setattr(cli, "SILENT_RANK_EXIT_DELAY", 0.5)
    missing = str(tmp_path / "missing.jpg")
    started = time.monotonic()
    assert main(["stylize", missing, STYLE, "-o", str(tmp_path / "out.png")]) == 2
    assert (time.monotonic() - started >= 0.5) == (not said)
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == (1 if said else 0), err
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:  # the command's own errors too
        main(["stylize", missing, STYLE, "-o", str(tmp_path / "out.png"), "--iters", "x"])
    assert (time.monotonic() - started >= 0.5) == (not said)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith(said.replace("cannot read image", "argument --iters")), err
    assert err.count("\n") == (1 if said else 0), err


def test_a_rank_outside_the_world_says_so_itself(monkeypatch, capsys):
    # its own torchrun variables: rank 0 does not share them
    for name, value in dict(RANK="2", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)
    argv = ["stylize", CONTENT, STYLE, "-o", "out.png", "--size", "64", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cast: error: rank 2: RANK=2 with WORLD_SIZE=2: "), err
    assert err.count("\n") == 1, err


def test_ranks_plan_alike_with_the_least_memory_each_share_of_one_machines(tmp_path):
    """Each rank planned with its own free memory: ranks with less of it (another GPU, a busy
    machine) chose other tiles and their collectives did not match (gloo aborted a rank); and
    CPU ranks on one machine each counted all of its RAM, though every rank holds the image and
    its state: two of them planned for twice what there is."""
    env = os.environ | {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "cast", "stylize", CONTENT, STYLE, "-o", str(tmp_path / "o.png"),
            "--size", "256", "--scales", "1", "--device", "cpu", "--dry-run"]  # fmt: skip
    ranks = [subprocess.Popen(argv, env=env | {"RANK": str(r), "LOCAL_RANK": str(r),
                                               "CAST_MEMORY_GIB": gib},
                              stdout=subprocess.PIPE, text=True)
             for r, gib in enumerate(["2", "0.6"])]  # fmt: skip
    plans = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    # rank 0's plan is rank 1's too (stylize checks): printed once, not once a rank
    assert plans[0].endswith(" of 0.3 GiB free\n") and plans[1] == "", plans


def test_ranks_whose_plans_differ_stop_a_dry_run_with_one_line(tmp_path):
    """Only rank 0 prints the plan: another rank's would have been hidden."""
    out = str(tmp_path / "out.png")
    error = _two_commands(tmp_path, [CONTENT, STYLE, "-o", out, "--dry-run"],
                          [CONTENT, STYLE, "-o", out, "--dry-run", "--size", "96"])  # fmt: skip
    assert "rank 1 was given other settings or image sizes than rank 0" in error, error


CHECK_SCRIPT = """
import os, sys, torch
from cast import distributed
from cast.stylize import stylize
compared = []
check_same = distributed.Shard.check_same
def recording(shard, device, given):  # what the ranks compare, but the network's weights
    compared.append({{name: value for name, value in given.items() if "network" not in name}})
    return check_same(shard, device, given)
distributed.Shard.check_same = recording
stylize({content!r}, {style!r}, soft_masks=[{mask!r}], iters=1, **{run!r})
torch.save(compared, sys.argv[1] + "." + os.environ["RANK"])
"""


def test_ranks_compare_the_files_they_were_given_not_their_pixels(tmp_path):
    """The ranks hashed the decoded images: 6 s at --size 16384 (2.4 GiB of float32 content,
    as much style, 0.8 GiB a mask); their files (and the settings) decide them, in 0.06 s."""
    mask = tmp_path / "mask.png"
    images.save_image(torch.ones(3, 48, 64), mask)
    script = tmp_path / "rank.py"
    script.write_text(CHECK_SCRIPT.format(content=CONTENT, style=STYLE, mask=str(mask), run=RUN))
    _torchrun(script, tmp_path / "compared")
    for rank in (0, 1):
        [given] = torch.load(tmp_path / f"compared.{rank}")
        assert given["another content image"] == Path(CONTENT).read_bytes()
        assert given["other style images"] == [Path(STYLE).read_bytes()]
        assert given["other masks"] == (None, [], [mask.read_bytes()])
