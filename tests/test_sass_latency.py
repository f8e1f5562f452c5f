"""bench/sass_latency.py's simulator on hand-written SASS, where the answer is known."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import sass_latency  # noqa: E402
from sass import innermost_loops  # noqa: E402
from sass_latency import H100, hoisted, mma_loops, simulate  # noqa: E402
from test_cuda_sources import NVCC, cuobjdump  # noqa: E402


def loop(*lines: str) -> str:
    """A one-kernel cuobjdump listing: ``lines`` at 0x0, 0x10, .. and a branch back to 0x0."""
    code = [*lines, "BRA 0x0"]
    body = "\n".join(f"        /*{16 * i:04x}*/   {x} ;" for i, x in enumerate(code))
    return f"\n\t\tFunction : toy\n{body}\n"


# The address of each load comes from the previous trip's HMMA: one chain through the trip.
CHAIN = loop("LDS R1, [R12]", "FMUL R2, R1, R1", "HMMA.1688.F32.TF32 R12, R4, R2, RZ")


def test_dependent_chain_costs_the_sum_of_latencies():
    """LDS -> FMUL -> HMMA -> the next trip's LDS address: one warp waits for each result, so a
    trip is the sum of the three latencies (the branch issues in the HMMA's shadow); a second
    warp on the scheduler runs its own chain in those waits: each trip as long as alone, but
    for a slot or two lost to the other warp."""
    [program] = mma_loops(CHAIN, "toy")
    chain = H100.latency["LDS"] + 4 + H100.latency["HMMA"]
    assert simulate(program, warps=1).cycles_per_trip == chain
    two = simulate(program, warps=2)
    assert chain <= two.cycles_per_trip <= chain + 2  # two trips in the time of one
    assert two.stalls()["wait LDS"] > two.stalls()["not selected"]


def test_independent_work_is_bound_by_the_pipes():
    """Nine HMMAs on their own accumulators: the tensor pipe, one every 4 cycles, bounds one
    warp (9 x 4 a trip, more than an HMMA's latency) and two share it (18 x 4 a trip each)."""
    hmmas = [f"HMMA.1688.F32.TF32 R{16 + 4 * i}, R4, R8, R{16 + 4 * i}" for i in range(9)]
    [program] = mma_loops(loop(*hmmas), "toy")
    assert simulate(program, warps=1).cycles_per_trip == 9 * H100.hmma_interval
    assert simulate(program, warps=2).cycles_per_trip == 18 * H100.hmma_interval


def test_loads_a_trip_ahead_leave_the_chain():
    """Eight HMMAs, then a load feeding a multiply feeding a ninth: one warp waits out the
    load and the multiply at the trip's end (7 x 4 + 1 cycles of HMMAs, LDS 29, FMUL 4, then
    4 until the pipe takes the next trip's first HMMA: 66). With the load moved to the trip's
    top (its register renamed) its latency hides behind the eight HMMAs: the tensor pipe's
    9 x 4 is left (and a cycle the multiply's 4 cycles take from it)."""
    hmmas = [f"HMMA.1688.F32.TF32 R{16 + 4 * i}, R4, R8, R{16 + 4 * i}" for i in range(8)]
    tail = ["LDS R1, [R0]", "FMUL R2, R1, R1", "HMMA.1688.F32.TF32 R12, R4, R2, R12"]
    [program] = mma_loops(loop(*hmmas, *tail), "toy")
    moved = hoisted(program)
    assert [x.base for x in moved] == ["LDS", *["HMMA"] * 8, "FMUL", "HMMA", "BRA"]
    assert moved[0].writes == {"R1'80"} and moved[9].reads == {"R1'80"}
    interval = H100.hmma_interval
    assert simulate(program, warps=1).cycles_per_trip == 7 * 4 + 1 + 29 + 4 + interval
    assert 9 * interval <= simulate(moved, warps=1).cycles_per_trip <= 9 * interval + 1


def test_operands_are_read_as_the_machine_reads_them():
    """Address registers, wide operands, guards and predicates count as reads."""
    [hmma, lds, setp, imad, _] = mma_loops(
        loop(
            "HMMA.1688.F32.TF32 R100, R44, R144.reuse, R100",
            "LDS R139, [R62+UR4+0x20]",
            "FSETP.GEU.AND P1, PT, |R144|, +INF , PT",
            "@!P1 IMAD.IADD.U32 R145, R145, 0x1, R61",
        ),
        "toy",
    )[0]
    assert hmma.reads == {f"R{i}" for i in (*range(44, 48), 144, 145, *range(100, 104))}
    assert hmma.writes == {f"R{i}" for i in range(100, 104)}
    assert lds.reads == {"R62", "UR4"} and lds.writes == {"R139"} and lds.wavefronts == 1
    assert setp.writes == {"P1"} and setp.reads == {"R144"}
    assert imad.reads == {"P1", "R145", "R61"}


def test_destinations_are_what_the_machine_writes():
    """A store's and a cp.async's first operand is an address, read and never written (a 64-bit
    address names two registers); the predicates right after IADD3's and LEA's destination are
    carries out, written; CS2R writes a register pair."""
    [[copy, store, add, lea, zero, _]] = innermost_loops(
        loop(
            "LDGSTS.E.BYPASS.128 [R35+0x10c00], desc[UR10][R20.64], P1",
            "STG.E desc[UR22][R2.64], R5",
            "IADD3 R30, P1, P4, R28, R18, R55.reuse",
            "LEA.HI.X R5, R3, UR7, R6, 0x2, P2",
            "CS2R R22, SRZ",
        )
    )["toy"]
    assert copy.writes == store.writes == set()
    assert copy.reads == {"R35", "UR10", "R20", "R21", "P1"}
    assert store.reads == {"UR22", "R2", "R3", "R5"}
    assert add.writes == {"R30", "P1", "P4"} and add.reads == {"R28", "R18", "R55"}
    assert lea.writes == {"R5"} and lea.reads == {"R3", "UR7", "R6", "P2"}
    assert zero.writes == {"R22", "R23"}


@pytest.mark.skipif(NVCC is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_the_backward_loops_are_found():
    """The f32 backward's MMA loop (8-row tiles, r = 3), compiled as the tests compile them:
    one, a trip of one mask's four input steps of 12 HMMAs; not faster than the tensor pipe
    allows two warps."""
    sass = sass_latency.sass_of(sass_latency.ROOT / "csrc" / "masked_gram_cuda_backward.cu")
    loops = mma_loops(sass, sass_latency.KERNELS[0][2])
    hmmas = [sum(x.base == "HMMA" for x in program) for program in loops]
    assert hmmas == [48]
    for program, count in zip(loops, hmmas, strict=True):
        assert simulate(program, warps=2).cycles_per_trip >= 2 * count * H100.hmma_interval
