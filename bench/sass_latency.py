"""A latency model of the CUDA kernels' MMA loops: their sm_90 SASS issued in order, no GPU needed.

``bench/issue_model.py`` charges issue slots and pipe rates only; the CUDA backward's MMA loop
lost a third of its instructions at 68ef306 and did not get faster (gpu-notes, "The quick lease
of 68ef306"): one 256-thread block an SM leaves two warps a scheduler, too few to hide a warp's
own dependent waits. This simulates that. For each innermost loop holding HMMAs (the SASS
``tests/test_cuda_sources.py`` reads, compiled with its nvcc flags), W warps (default 2: one
scheduler's share of 8) issue the loop body in order, trip after trip:

- the scheduler issues at most one instruction a cycle, the least recently issued ready warp's;
- an instruction waits until every register it reads (address and guard predicate included)
  or writes has been written by its producer (a scoreboard: read-after-write and
  write-after-write; in-order issue covers write-after-read);
- a producer's result is ready ``latency`` cycles after it issued (the table below);
- the tensor pipe takes one HMMA every ``hmma_interval`` cycles from the scheduler's warps: an
  HMMA waits at issue for it; shared memory serves one 128-byte wavefront every 4 cycles (an
  SM's one a clock, shared by its four schedulers), in order: a load issues at once and its
  latency counts from when its turn comes (a queue without limit).

Cycles a trip are a warp's steady state (trips 8 to 24 of 24: the operands one trip loads for the
next are carried across the back edge). The stall that dominates is the reason warps spent most
cycles not issuing: waiting on a producer (by the producer's opcode), a busy pipe, or "not
selected" (ready, another warp issued).

Numbers (cycles at the SM clock), and where they come from:

- shared-memory load (LDS): 29. An H100 SXM5 pointer chase through shared memory, 28.6 cycles
  (the public slides "CUDA Performance Study — H100 SXM5", CUDA 12.8, found by the search
  corpus; the same deck's 29-cycle ALU latency includes its loop's overhead and is not used).
- fixed-latency ALU ops (FMUL, FFMA, FADD, IMAD, IADD3, ISETP, FSETP, LEA, MOV, SEL, SHF, LOP3,
  F2FP, ...): 4. Measured as 4 for a dependent add.f32 on the A100 (Abdelkhalik et al.,
  "Demystifying the Nvidia Ampere Architecture through Microbenchmarking and Instruction-level
  Analysis", arXiv:2208.11174); assumed the same on Hopper, and for every fixed-latency opcode.
- HMMA tensor pipe: one HMMA.1688.F32.TF32 (2048 flops) or HMMA.16816.F32.BF16 (4096) every 4
  cycles a scheduler. From the H100 SXM's dense peaks, BF16 989.5 TFLOP/s = 132 SMs x 1.83 GHz
  x 4096 flops a clock and SM (NVIDIA/cudnn-frontend pull request 650), TF32 half that; assumed
  that mma.sync issues at that peak (the measured torch.mm peaks, 400 TF32 and 788 bf16
  TFLOP/s, are 81 % and 80 % of it, with wgmma).
- HMMA latency 33, LDSM (ldmatrix .x4) 33: assumed. The Hopper study that measures mma.sync and
  ldmatrix (Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture",
  arXiv:2402.13499) was found, its tables were not readable here.

Other assumptions: no instruction-cache, branch or register-bank stalls (a taken back edge costs
its issue slot only); HMMA reads its operands at issue; shared loads free of bank conflicts
(a load's wavefronts: its bytes / 128); every opcode not named above is fixed-latency; uniform
registers (URx) are scoreboarded like the others; the loop runs many trips in a row (the
backward's runs one trip and a remainder iteration per input step at K = 3); the other three
schedulers run the same loop (hence a quarter of the shared-memory rate).

    python bench/sass_latency.py              # backward f32 / bf16 (8-row tiles), forward
    python bench/sass_latency.py --hoist      # also: every load a trip ahead (see hoisted())
    python bench/sass_latency.py --sass F.sass --kernel REGEX   # any listing, any kernel
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from sass import Instruction, innermost_loops  # noqa: E402
from test_cuda_sources import cuobjdump, nvcc_command  # noqa: E402

FIXED_LATENCY = 4
VARIABLE = ("LDS", "LDSM", "HMMA")  # waited for by scoreboard; the rest by fixed stall counts


@dataclass(frozen=True)
class Machine:
    """Result latencies by opcode (the part before the first dot), the rest fixed."""

    latency: dict[str, int] = field(default_factory=lambda: {"LDS": 29, "LDSM": 33, "HMMA": 33})
    hmma_interval: int = 4
    smem_cycles: int = 4  # a 128-byte wavefront: one a clock an SM, over its four schedulers

    def result_latency(self, op: str) -> int:
        return self.latency.get(op.split(".")[0], FIXED_LATENCY)


H100 = Machine()


@dataclass
class Result:
    cycles_per_trip: float
    # Per instruction of the body: the warp-cycles a warp waited to issue it, by reason, summed
    # over the warps and the measured trips.
    waits: list[collections.Counter]
    trips: int  # the warp-trips summed in waits

    def stalls(self, first: int = 0, last: int | None = None) -> collections.Counter:
        """Waits before instructions first .. last - 1, a warp's per trip."""
        total = sum(self.waits[first:last], collections.Counter())
        return collections.Counter({k: v / self.trips for k, v in total.items()})

    def dominant(self, first: int = 0, last: int | None = None, top: int = 2) -> str:
        stalls = self.stalls(first, last)
        shares = [f"{k} {100 * v / sum(stalls.values()):.0f} %" for k, v in stalls.most_common(top)]
        return ", ".join(shares) or "none"


def simulate(
    program: list[Instruction], warps: int = 2, machine: Machine = H100, trips: int = 24
) -> Result:
    """W warps run ``trips`` trips of the loop body on one scheduler; a warp's steady state."""
    n, warmup = len(program), trips // 3
    ready = [{} for _ in range(warps)]  # register -> (cycle its value is ready, producer)
    pc, last_issue = [0] * warps, [-1] * warps
    trip_start = [[0] * trips for _ in range(warps)]
    pipe_free = {"tensor": 0, "smem": 0}
    waits = [collections.Counter() for _ in program]
    cycle = 0
    while any(p < trips * n for p in pc):
        waiting = {}
        for w in range(warps):
            if pc[w] < trips * n:
                waiting[w] = blocked(program[pc[w] % n], ready[w], pipe_free, cycle)
        issuable = [w for w, reason in waiting.items() if reason is None]
        chosen = min(issuable, key=last_issue.__getitem__) if issuable else None
        for w, reason in waiting.items():
            if w != chosen and pc[w] >= warmup * n:
                waits[pc[w] % n][reason or "not selected"] += 1
        if chosen is not None:
            ins = program[pc[chosen] % n]
            start = cycle  # when its pipe takes it
            if ins.base == "HMMA":
                pipe_free["tensor"] = cycle + machine.hmma_interval
            if ins.wavefronts:  # queued: served in order, after the loads before it
                start = max(cycle, pipe_free["smem"])
                pipe_free["smem"] = start + ins.wavefronts * machine.smem_cycles
            for register in ins.writes:
                ready[chosen][register] = (start + machine.result_latency(ins.op), ins.base)
            if pc[chosen] % n == 0:
                trip_start[chosen][pc[chosen] // n] = cycle
            pc[chosen] += 1
            last_issue[chosen] = cycle
        cycle += 1
    steady = [(s[-1] - s[warmup]) / (trips - 1 - warmup) for s in trip_start]
    return Result(sum(steady) / warps, waits, warps * (trips - warmup))


def blocked(ins: Instruction, ready: dict, pipe_free: dict, cycle: int) -> str | None:
    """Why ``ins`` cannot issue at ``cycle`` (None: it can)."""
    pending = [ready[r] for r in ins.reads | ins.writes if r in ready and ready[r][0] > cycle]
    if pending:
        producer = max(pending)[1]
        return f"wait {producer}" if producer in VARIABLE else "wait ALU"
    if ins.base == "HMMA" and pipe_free["tensor"] > cycle:
        return "tensor pipe"
    return None


def hoisted(program: list[Instruction]) -> list[Instruction]:
    """The loop as if every shared load whose value this trip uses had been issued a trip
    ahead: such loads move to the trip's top, their destinations renamed (registers the change
    would need) up to the next write of the same register, so only the true chain remains."""
    body, moved = list(program), []
    for i, ins in enumerate(program):
        if ins.base not in ("LDS", "LDSM"):
            continue
        later = program[i + 1 :]
        uses = next((j for j, x in enumerate(later) if x.reads & ins.writes), None)
        redefined = next((j for j, x in enumerate(later) if x.writes & ins.writes), len(later))
        if uses is None or uses > redefined:
            continue  # feeds the next trip already
        fresh = {r: f"{r}'{ins.address:x}" for r in ins.writes}

        def rename(x: Instruction, fresh=fresh) -> Instruction:
            return replace(x, reads=frozenset(fresh.get(r, r) for r in x.reads))

        for j in range(i + 1, min(i + 2 + redefined, len(program))):  # the redefiner reads it
            body[j] = rename(body[j])
        moved.append(replace(ins, writes=frozenset(fresh.values())))
        body[i] = None
    return moved + [x for x in body if x is not None]


def sass_of(source: pathlib.Path, arch: str = "sm_90") -> str:
    """``source`` compiled as the tests compile it, disassembled."""
    with tempfile.TemporaryDirectory() as folder:
        output = pathlib.Path(folder) / "kernels.o"
        subprocess.run(nvcc_command(source, arch, output), check=True, capture_output=True)
        return subprocess.run(
            [cuobjdump(), "-sass", str(output)], check=True, capture_output=True, text=True
        ).stdout


def mma_loops(sass: str, kernel: str) -> list[list[Instruction]]:
    """The innermost loops holding HMMAs of the first kernel whose name matches ``kernel``."""
    for name, loops in innermost_loops(sass).items():
        if re.search(kernel, name):
            return [body for body in loops if any(x.base == "HMMA" for x in body)]
    raise LookupError(f"no kernel matches {kernel}")


# (what, source, kernel): the kernels the op runs at r = 3 (h = 1), K = 3.
KERNELS = [
    ("backward f32, 8-row tiles", "masked_gram_cuda_backward.cu",
     r"bwd_mma_kernelIfLi8ELi1ELi0EE"),
    ("backward bf16, 8-row tiles", "masked_gram_cuda_backward_bf16.cu",
     r"bwd_mma_kernelI13__nv_bfloat16Li8ELi1ELi0EE"),
    ("forward f32 (TF32), 8-row tiles", "masked_gram_cuda_forward.cu",
     r"fwd_kernelIfLb1ELi8ELi0EE"),
    ("forward bf16, 8-row tiles", "masked_gram_cuda_forward_16bit.cu",
     r"fwd_kernelI13__nv_bfloat16Lb1ELi8ELi0EE"),
]  # fmt: skip


def row(what: str, program: list[Instruction], machine: Machine) -> str:
    hmmas = sum(x.base == "HMMA" for x in program)
    wavefronts = sum(x.wavefronts for x in program)
    one, two = simulate(program, 1, machine), simulate(program, 2, machine)
    cells = [
        what, len(program), hmmas, f"{one.cycles_per_trip:.0f}", f"{two.cycles_per_trip:.0f}",
        2 * hmmas * machine.hmma_interval, 2 * len(program),
        2 * wavefronts * machine.smem_cycles, two.dominant(),
    ]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def halves(what: str, program: list[Instruction], machine: Machine) -> str:
    """Where a trip's waits fall: up to its middle HMMA (the first iteration of an unrolled
    pair) and after it, a warp's cycles a trip, with the two largest reasons."""
    hmmas = [i for i, x in enumerate(program) if x.base == "HMMA"]
    middle = hmmas[len(hmmas) // 2 - 1] + 1
    cells = [what]
    for warps in (1, 2):
        result = simulate(program, warps, machine)
        for first, last in ((0, middle), (middle, None)):
            waited = sum(result.stalls(first, last).values())
            cells.append(f"{waited:.0f}: {result.dominant(first, last)}")
    return "| " + " | ".join(cells) + " |"


HALVES = (
    "| loop | W = 1, first half | W = 1, second half | W = 2, first half | W = 2, second half "
    "|\n| --- | --- | --- | --- | --- |"
)
HEADER = (
    "| loop | instructions | HMMA | cycles a trip, W = 1 | W = 2 | tensor pipe, W = 2 | issue, "
    "W = 2 | shared memory, W = 2 | dominant stall, W = 2 |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=pathlib.Path, help="a cuobjdump -sass listing")
    parser.add_argument("--kernel", help="a regex on the kernel's name (with --sass)")
    parser.add_argument("--hoist", action="store_true", help="also every load a trip ahead")
    parser.add_argument("--halves", action="store_true", help="waits by half of a trip")
    parser.add_argument("--lds", type=int, default=H100.latency["LDS"])
    parser.add_argument("--ldsm", type=int, default=H100.latency["LDSM"])
    parser.add_argument("--hmma", type=int, default=H100.latency["HMMA"], help="HMMA latency")
    parser.add_argument("--interval", type=int, default=H100.hmma_interval)
    parser.add_argument("--smem", type=int, default=H100.smem_cycles, help="cycles a wavefront")
    args = parser.parse_args()
    latency = {"LDS": args.lds, "LDSM": args.ldsm, "HMMA": args.hmma}
    machine = Machine(latency, args.interval, args.smem)
    if args.sass:
        kernels = [(args.kernel, args.sass.read_text(), args.kernel)]
    else:
        kernels = [(what, sass_of(ROOT / "csrc" / source), k) for what, source, k in KERNELS]
    print(f"latencies {machine.latency}, fixed {FIXED_LATENCY}, an HMMA every "
          f"{machine.hmma_interval} cycles, a shared-memory wavefront every "
          f"{machine.smem_cycles}; bounds for W = 2 warps\n\n{HEADER}")  # fmt: skip
    loops = []
    for what, sass, kernel in kernels:
        for program in mma_loops(sass, kernel):
            loops.append((f"{what}, loop at {program[0].address:#x}", program))
            if args.hoist:
                loops.append((f"{what}, loop at {program[0].address:#x}, loads a trip ahead",
                              hoisted(program)))  # fmt: skip
    for label, program in loops:
        print(row(label, program, machine))
    if args.halves:
        print(f"\nWarp-cycles a trip waited to issue, by half of the trip\n\n{HALVES}")
        for label, program in loops:
            print(halves(label, program, machine))


if __name__ == "__main__":
    main()
