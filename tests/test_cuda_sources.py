"""The CUDA C++ sources, checked without a GPU.

1. Every ``csrc/*.cu`` compiles with ``nvcc`` for Hopper and Ampere, warnings as errors, so a
   syntax or template error cannot land (skipped where nvcc is absent); the ATen glue
   ``csrc/masked_gram_cuda_ops.cpp`` parses against torch's and CUDA's headers.
2. The kernels (``csrc/masked_gram_cuda_kernels.cuh``) run on the CPU, unchanged, under a small
   CUDA emulation (``tests/cuda_emulation.py``): one block at a time, one ``std::thread`` per
   CUDA thread, ``__syncthreads`` a barrier, shared memory poisoned with NaN; their forward and
   backward are compared with the float64 reference on the op tests' labelled shapes. This
   checks the index arithmetic, halos, tiling, splits, and the placement of barriers and of the
   waits for cp.async copies and wgmmas (both done as late as a GPU may); it cannot check
   timing, warp-level behaviour, the proxy fences or the ATen glue at run time
   (tests/test_gpu.py does, on a GPU).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import cuda_emulation
import pytest
import torch
from cases import CASES, Case, relative_error
from cuda_emulation import DTYPE_CODES, PLAN_FIELDS

from cast import backends
from cast.ops import canonical_inverse_mass
from cast.reference import (
    gram_dtype,
    masked_gram_backward_reference,
    masked_gram_reference,
    symmetric_grad,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
from sass import LINE, Instruction, innermost_loops, instruction  # noqa: E402  (bench/sass.py)

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
ARCHS = ["sm_90", "sm_80"]


def ptxas_report(stderr: str) -> dict[str, dict[str, int]]:
    """Per kernel, what ``-Xptxas -v`` says: stack frame, spill stores and loads, registers,
    static shared memory (bytes)."""
    kernels, name = {}, None
    for line in stderr.splitlines():
        if found := re.search(r"Compiling entry function '(\w+)'", line):
            name = found[1]
            kernels[name] = dict(stack=0, spill_stores=0, spill_loads=0, registers=0, smem=0)
        elif name and (found := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill st", line)):
            kernels[name].update(stack=int(found[1]), spill_stores=int(found[2]))
            kernels[name]["spill_loads"] = int(re.search(r"(\d+) bytes spill loads", line)[1])
        elif name and (found := re.search(r"Used (\d+) registers", line)):
            kernels[name]["registers"] = int(found[1])
            if smem := re.search(r"(\d+) bytes smem", line):
                kernels[name]["smem"] = int(smem[1])
    return kernels


def cuobjdump() -> str | None:
    """The cuobjdump Triton ships (this machine's CUDA toolkit has only the compiler)."""
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.is_file() else shutil.which("cuobjdump")


def sass_opcodes(sass: str) -> dict[str, collections.Counter]:
    """Per kernel of a ``cuobjdump -sass`` listing, how often each opcode occurs."""
    kernels = {}
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        kernels[name] = collections.Counter(re.findall(OPCODE, block, re.M))
    return kernels


OPCODE = r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Za-z0-9_.]*)"


def hmma_runs(sass: str) -> dict[str, list[int]]:
    """Per kernel of a ``cuobjdump -sass`` listing, the lengths of its runs of HMMAs that no
    branch (BRA, or a convergence barrier BSSY / BSYNC) interrupts, in program order."""
    kernels = {}
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        runs, run = [], 0
        for op in re.findall(OPCODE, block, re.M):
            if op.startswith("HMMA"):
                run += 1
            elif op.split(".")[0] in ("BRA", "BSSY", "BSYNC") and run:
                runs, run = [*runs, run], 0
        kernels[block.split("\n", 1)[0].strip()] = runs + ([run] if run else [])
    return kernels


def hmmas_fed_early(sass: str) -> dict[str, list[tuple[int, int]]]:
    """Per kernel, for each innermost loop holding HMMAs: its HMMAs, and how many of them take
    operands that no shared-memory load of the same trip feeds (traced through the
    instructions between, predicates included), i.e. operands loaded a trip ahead."""
    return {
        name: [fed_early(body) for body in loops if any(x.base == "HMMA" for x in body)]
        for name, loops in innermost_loops(sass).items()
    }


def load_distances(sass: str) -> dict[str, list[int]]:
    """Per kernel, for each innermost loop holding HMMAs: the fewest instructions between an
    HMMA and the nearest shared-memory load that feeds its A or B operands (traced back through
    the instructions between, across the loop's back edge), i.e. how long the latest load an
    HMMA waits for has to land."""
    return {
        name: [min(fed_distances(body)) for body in loops if any(x.base == "HMMA" for x in body)]
        for name, loops in innermost_loops(sass).items()
    }


def fed_distances(body: list[Instruction]) -> list[int]:
    twice = body + body  # a trip, and the trip before it
    distances = []
    for end in range(len(body), len(twice)):
        if twice[end].base != "HMMA":
            continue
        wanted = twice[end].multiplicands
        for back in range(end - 1, -1, -1):
            producer = twice[back]
            if written := producer.writes & wanted:
                if producer.base in ("LDS", "LDSM"):
                    distances.append(end - back)
                    break
                wanted = (wanted - written) | producer.reads
    return distances


def fed_early(body: list[Instruction]) -> tuple[int, int]:
    fed, hmmas, early = set(), 0, 0  # fed: registers this trip's loads reach
    for x in body:
        if x.base == "HMMA":
            hmmas, early = hmmas + 1, early + (not x.multiplicands & fed)
        elif x.base in ("LDS", "LDSM") or x.reads & fed:
            fed |= x.writes
        else:
            fed -= x.writes
    return hmmas, early


def compiled(source: pathlib.Path, arch: str, folder: str) -> subprocess.CompletedProcess:
    """nvcc's verdict on ``source`` for ``arch``, warnings as errors, with ptxas' report; the
    object lands in ``folder`` for cuobjdump."""
    return compiled_all(arch, folder)[source]


@functools.cache
def compiled_all(arch: str, folder: str) -> dict[pathlib.Path, subprocess.CompletedProcess]:
    """Every .cu for ``arch``, as many at once as there are cores (the kernels are split into
    parts for that, csrc/masked_gram_cuda_kernels.cuh)."""

    def nvcc(source: pathlib.Path) -> subprocess.CompletedProcess:
        command = nvcc_command(source, arch, object_file(source, arch, folder))
        return subprocess.run(command, capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        return dict(zip(CU_SOURCES, pool.map(nvcc, CU_SOURCES), strict=True))


def nvcc_command(source: pathlib.Path, arch: str, output: pathlib.Path) -> list[str]:
    """How the kernels are compiled here (bench/sass_latency.py reads the same machine code)."""
    return [
        NVCC, "-std=c++20", f"-arch={arch}", "-O3", "--use_fast_math",
        "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra", "-Xptxas", "-v",
        "-c", str(source), "-o", str(output),
    ]  # fmt: skip


def object_file(source: pathlib.Path, arch: str, folder: str) -> pathlib.Path:
    return pathlib.Path(folder) / f"{source.stem}-{arch}.o"


@pytest.fixture(scope="module")
def build_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nvcc"))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=[p.name for p in CU_SOURCES])
def test_nvcc_compiles_warning_free(source, arch, build_folder):
    """Warning-free for Hopper and Ampere, and what ptxas reports per kernel: at most 255
    registers, 227 KiB of static shared memory and no spills (no stack frame) in any kernel,
    float64's included."""
    result = compiled(source, arch, build_folder)
    assert result.returncode == 0, result.stderr
    report = [line for line in result.stderr.splitlines() if line.startswith("ptxas info")]
    warnings = [line for line in result.stderr.splitlines() if line not in report]
    assert [line for line in warnings if "bytes stack frame" not in line] == [], result.stderr
    for name, used in ptxas_report(result.stderr).items():
        assert used["registers"] <= 255 and used["smem"] <= 227 * 1024, (name, used)
        spilled = used["stack"] + used["spill_stores"] + used["spill_loads"]
        assert spilled == 0, f"{name} on {arch}: {used}"


# The kernels' template arguments (input type, tensor cores) as the mangled names spell them.
# The last template argument: 0 for the kernels the op runs, 1-4 for bench/gpu_probe.py's variants.
FORWARD_KERNEL = re.compile(
    r"_masked_gram_fwd_kernelI(f|d|13__nv_bfloat16|6__half)Lb([01])ELi\dELi0E"
)
MMA_BACKWARD_KERNEL = re.compile(
    r"_masked_gram_bwd_mma_kernelI(f|13__nv_bfloat16|6__half)Li(\d)ELi(\d)ELi0E"
)
# The tensor-core backward's n-tiles of 8 positions per warp (MmaBackwardTile::n_tiles) by tile
# rows and halo h = r / 2 (the tiles each take): a (mask, input step) iteration is 4 x n HMMAs
# (each warp all 64 output channels, 4 m-tiles).
BACKWARD_N_TILES = {8: (2, 3, 4), 4: (1, 2, 3, 4)}
PROBE_KERNEL = re.compile(r"_masked_gram_(fwd|bwd_mma)_kernelI(f|13__nv_bfloat16)\w*ELi[1-4]EE")
SIMT_BACKWARD_KERNEL = re.compile(r"_masked_gram_bwd_simt_kernelI(f|d|13__nv_bfloat16|6__half)E")
# The tensor-core instruction each input type's kernels must use, and the only one.
KERNEL_MMA = {"f": "HMMA.1688.F32.TF32", "13__nv_bfloat16": "HMMA.16816.F32.BF16",
               "6__half": "HMMA.16816.F32"}  # fmt: skip


# The parts that differ where nvcc compiles for sm_90a (wgmma: CAST_WGMMA): the forward's and
# the backward's, every input type's.
WGMMA_SOURCES = [CSRC / f"masked_gram_cuda_{part}.cu"
                 for part in ("forward", "forward_16bit", "backward", "backward_bf16",
                              "backward_f16")]  # fmt: skip
# The tensor-core backward's kernels on wgmma, by (tile rows, halo h): those whose halo fills
# whole m-tiles of 64 positions (u_padded: 128, 192, 256; 64, 128), the rest mma.sync.
WGMMA_BACKWARD = {(8, 0), (8, 1), (8, 2), (4, 0), (4, 1)}
# The wgmma each tensor-core forward must use, and the only tensor-core instruction there.
KERNEL_WGMMA = {"f": "HGMMA.64x32x8.F32.TF32", "13__nv_bfloat16": "HGMMA.64x32x16.F32.BF16",
                "6__half": "HGMMA.64x32x16.F32"}  # fmt: skip


def wgmma_hazards(sass: str) -> list[str]:
    """The instructions of a kernel's SASS, in address order, that touch a register an HGMMA
    still has in flight (its A fragment, 4 registers, and its 16 accumulators: ptxas does not
    guard them) or branch or wait at a barrier with one in flight: an HGMMA's group (closed by
    gsb0) is in flight until a WARPGROUP.DEPBAR leaves fewer groups pending. With no branch
    between an HGMMA and its wait, every path from one to the other is the one in address
    order, so the scan sees them all (the forward's wait at 1 pending: a group across each
    loop's back edge, found here)."""
    groups, hazards = [set()], []  # the committed groups in flight, the open one last
    for address, guard, op, operands in LINE.findall(sass):
        ops = operands.split(",")
        if op.startswith("HGMMA"):
            d, a = (int(o.strip().removeprefix("R")) for o in ops[:2])  # D, A in registers
            groups[-1] |= {f"R{i}" for i in [*range(d, d + 16), *range(a, a + 4)]}
            groups += [set()] if "gsb0" in operands else []
        elif op.startswith("WARPGROUP.DEPBAR"):
            pending = int(ops[-1], 16)
            groups = groups[: -1][len(groups) - 1 - pending :] + [groups[-1]]
        elif in_flight := set().union(*groups):
            x = instruction(int(address, 16), op, ops, guard or "")
            if (x.reads | x.writes) & in_flight or x.base in ("BRA", "BAR", "EXIT"):
                hazards.append(f"{address} {op} {operands}")
    return hazards


def test_wgmma_hazards_on_written_sass():
    """The hazard finder on hand-written SASS: a write of an A register before the wait is one,
    after it none, and so is a read of an accumulator or a branch before it; a wait that leaves
    a group pending leaves its registers in flight."""
    listing = """
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x32x8.F32.TF32 R24, R168, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   LOP3.LUT R169, R207, 0xffffe000, RZ, 0xc0, !PT ;
        /*0040*/                   FADD R9, R39, R2 ;
        /*0050*/                   FMUL.FTZ R207, R198, R203 ;
        /*0060*/              @!P0 BRA 0x10 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0080*/                   LOP3.LUT R170, R207, 0xffffe000, RZ, 0xc0, !PT ;
"""
    assert [h.split()[0] for h in wgmma_hazards(listing)] == ["0030", "0040", "0060"]
    one_left = listing.replace("gsb0, 0x0", "gsb0, 0x1")
    assert [h.split()[0] for h in wgmma_hazards(one_left)] == ["0030", "0040", "0060", "0080"]


@pytest.mark.skipif(NVCC is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_wgmma_machine_code(tmp_path):
    """Built for sm_90a, the tensor-core forward multiplies on wgmma (HGMMA m64n32, A from
    registers, B from Z in shared memory through a descriptor) of its input type, and nothing
    else (no HMMA); so does the tensor-core backward of every input type wherever its halo
    fills whole m-tiles (B = S through a descriptor), the rest on mma.sync; warning-free and
    spill-free as the other targets. Nothing between an HGMMA and its wait touches its A or
    accumulator registers or leaves (ptxas does not guard registers a wgmma in flight reads):
    forward and backward keep one group in flight (WARPGROUP.DEPBAR to 1 pending) while the
    next step scales into a second set of registers, and wait for all (to 0) before a branch.
    The SIMT kernels have no wgmma."""

    def compile_and_dump(source):
        output = tmp_path / f"{source.stem}.o"
        result = subprocess.run(nvcc_command(source, "sm_90a", output), capture_output=True,
                                text=True)  # fmt: skip
        objdump = [cuobjdump(), "-sass", str(output)]
        sass = subprocess.run(objdump, capture_output=True, text=True).stdout
        return result, sass

    with concurrent.futures.ThreadPoolExecutor(len(WGMMA_SOURCES)) as pool:
        built = list(pool.map(compile_and_dump, WGMMA_SOURCES))
    forward, backward = {}, {}
    for result, sass in built:
        assert result.returncode == 0, result.stderr
        report = [line for line in result.stderr.splitlines() if line.startswith("ptxas info")]
        warnings = [line for line in result.stderr.splitlines() if line not in report]
        assert [line for line in warnings if "bytes stack frame" not in line] == [], result.stderr
        # ptxas' "Potential Performance Loss: wgmma.mma_async instructions are serialized"
        # (C7518, an info line): its own waits where the code leaves a hazard (the backward's
        # accumulators read after a wait for all but one group did that).
        assert "wgmma.mma_async instructions are serialized" not in result.stderr, result.stderr
        for name, used in ptxas_report(result.stderr).items():
            spilled = used["stack"] + used["spill_stores"] + used["spill_loads"]
            assert used["registers"] <= 255 and spilled == 0, (name, used)
        blocks = {b.split("\n", 1)[0].strip(): b for b in re.split(r"\n\s+Function : ", sass)[1:]}
        forward |= {name: b for name, b in blocks.items() if FORWARD_KERNEL.search(name)}
        backward |= {name: b for name, b in blocks.items() if MMA_BACKWARD_KERNEL.search(name)}
    assert len(forward) == 10, sorted(forward)  # 3 MMA types x 2 tile heights, 4 SIMT
    assert len(backward) == 21, sorted(backward)  # 3 types x (8 rows r <= 5, 4 rows r <= 7)
    for name, block in backward.items():
        dtype, rows, halo = MMA_BACKWARD_KERNEL.search(name).groups()
        ops = collections.Counter(re.findall(OPCODE, block, re.M))
        mma = {op for op in ops if op.startswith(("HMMA", "HGMMA"))}
        wgmma = (int(rows), int(halo)) in WGMMA_BACKWARD
        assert mma == {KERNEL_WGMMA[dtype] if wgmma else KERNEL_MMA[dtype]}, (name, mma)
        waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", block)
        # a group in flight while the next step scales into the other register set; none
        # across the masks' loop
        assert (len(waits) > 0) == wgmma and set(waits) <= {"0x0", "0x1"}, (name, waits)
        assert wgmma_hazards(block) == [], name
    for name, block in forward.items():
        dtype, tensor_cores = FORWARD_KERNEL.search(name).groups()
        ops = collections.Counter(re.findall(OPCODE, block, re.M))
        mma = {op for op in ops if op.startswith(("HMMA", "HGMMA"))}
        assert mma == ({KERNEL_WGMMA[dtype]} if tensor_cores == "1" else set()), (name, mma)
        waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", block)
        # a step's group in flight while the next loads and scales, none past the last step
        assert set(waits) == ({"0x0", "0x1"} if tensor_cores == "1" else set()), (name, waits)
        assert wgmma_hazards(block) == [], name


@pytest.mark.skipif(NVCC is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_cuda_machine_code(build_folder):
    """What the sm_90 machine code of every kernel shows, as the design promises: tensor-core
    kernels, forward and backward, use the MMA of their input type (m16n8k8 TF32 for float32,
    m16n8k16 bf16 / f16 for 16-bit input, never TF32 there) and the SIMT ones none; F's halo
    comes in 16-byte cp.async copies (LDGSTS) in the tensor-core kernels, forward and backward,
    in 128-bit loads in the SIMT forward. (That TF32 operands are rounded, not truncated, the
    emulation checks.)"""
    listings = []
    for source, result in compiled_all("sm_90", build_folder).items():
        assert result.returncode == 0, result.stderr
        objdump = [cuobjdump(), "-sass", str(object_file(source, "sm_90", build_folder))]
        listings.append(subprocess.run(objdump, capture_output=True, text=True, check=True).stdout)
    sass = "\n".join(listings)
    kernels = sass_opcodes(sass)
    # Every kernel in one part only (the parts' `extern template`): none compiled twice.
    names = re.findall(r"\n\s+Function : (\S+)", sass)
    assert len(names) == len(set(names)) == len(kernels), collections.Counter(names).most_common(3)
    runs, fed, loops_of = hmma_runs(sass), hmmas_fed_early(sass), innermost_loops(sass)
    distances = load_distances(sass)
    forward = {name: ops for name, ops in kernels.items() if FORWARD_KERNEL.search(name)}
    assert len(forward) == 10, sorted(kernels)  # 3 MMA types x 2 tile heights, 4 SIMT
    for name, ops in forward.items():
        dtype, tensor_cores = FORWARD_KERNEL.search(name).groups()
        mma = {op for op in ops if op.startswith("HMMA")}
        assert mma == ({KERNEL_MMA[dtype]} if tensor_cores == "1" else set()), (name, mma)
        # (LDGSTS.E.BYPASS.LTC128B.128 where ptxas adds an L2 prefetch hint)
        vector = "LDGSTS.E.BYPASS." if tensor_cores == "1" else "LDG.E."
        wide = [op for op in ops if op.startswith(vector) and "128" in op.split(".")]
        assert wide, name
        if tensor_cores == "1":
            # The mask count a compile-time value: between branches a trip of two steps, 4 HMMAs
            # a step and mask (were runs of 4 and 8 between tests of the count, 85 instructions
            # a step: gpu-notes); the first step of each trip takes operands loaded in the one
            # before (no HMMA was fed early).
            assert sorted(set(runs[name])) == [8, 16, 24], (name, runs[name])
            loops = fed[name]
            assert loops and all(2 * early >= hmmas for hmmas, early in loops), (name, loops)
        if tensor_cores == "1" and dtype != "f":
            # A 16-bit Z formed two columns a lane from the halo's 32-bit words: 16-bit loads
            # only where an edge word's other half is unused (20 for 144 FFMA at r = 3), where
            # a lane a column took 30 for 72 (a third of the FFMAs over the kernel; gpu-notes).
            ffma = sum(count for op, count in ops.items() if op.startswith("FFMA"))
            assert 10 * ops["LDS.U16"] <= ffma, (name, ops["LDS.U16"], ffma)
    backward = {name: ops for name, ops in kernels.items() if MMA_BACKWARD_KERNEL.search(name)}
    # 3 MMA types x the halos each tile height takes (8 rows: r <= 5, 4 rows: r <= 7)
    assert len(backward) == 3 * 7, sorted(kernels)
    for name, ops in backward.items():
        dtype, rows, halo = MMA_BACKWARD_KERNEL.search(name).groups()
        mma = {op for op in ops if op.startswith("HMMA")}
        assert mma == {KERNEL_MMA[dtype]}, (name, mma)
        assert ops["LDGSTS.E.BYPASS.128"] > 0, name
        # A 16-bit Z formed two columns a lane from the halo's 32-bit words, both halves of
        # each used (the pair's first column ux - 2h is even): no 16-bit loads, where a lane a
        # column took 2 r (kGroup + 2h) for 2 kGroup outputs (42 for 10 at r = 3; gpu-notes).
        assert dtype == "f" or ops["LDS.U16"] == 0, (name, ops["LDS.U16"])
        # Whole iterations between branches: n-tiles a compile-time count, no test of the
        # bound between the HMMAs (there were 21 an iteration, the probe of effb4cf).
        n_tiles = BACKWARD_N_TILES[int(rows)][int(halo)]
        assert all(run % (4 * n_tiles) == 0 for run in runs[name]), (name, runs[name])
        # The operands (S fragments, B scaled by m_k^2) loaded two iterations ahead: at least
        # 12 instructions between an HMMA and the last shared-memory load it waits for (28 at
        # r = 3 with 8-row TF32 tiles). Loaded one ahead, ptxas put the second iteration of
        # each trip's LDSM 4-11 instructions before its HMMAs with 8-row TF32 tiles (gpu-notes).
        assert distances[name] and min(distances[name]) >= 12, (name, distances[name])
        # F's and S's 16-byte copies: no scalar border path inside their loops and a few
        # instructions a copy (were 48-91 with the scalar path inside: gpu-notes).
        copies = [body for body in loops_of[name] if any(x.base == "LDGSTS" for x in body)]
        per_copy = [len(b) / sum(x.base == "LDGSTS" for x in b) for b in copies]
        scalar = [x.op for b in copies for x in b if x.op.startswith("LDG.")]
        assert copies and max(per_copy) <= 32 and not scalar, (name, per_copy, scalar)
        # The convolutions (Z_j's formation, the adjoint) with the halo's geometry compile-time
        # (the kernel's kH): a column loop (FFMAs, no HMMA, no store) reads its rows at immediate
        # offsets, none behind a guard, so at most its own loop test and 40 % FFMA or more (the
        # formation's column at r = 3 was 48 instructions for 12 FFMA, 7 ISETP: gpu-notes).
        counts = [collections.Counter(x.base for x in body) for body in loops_of[name]]
        columns = [c for c in counts if c["FFMA"] and not c["HMMA"] and not c["STS"]]
        lean = [c["ISETP"] <= 1 and c["FFMA"] >= 0.4 * c.total() for c in columns]
        assert columns or int(halo) <= 1, name  # (r <= 3: ptxas unrolls the columns whole)
        assert all(lean), (name, [(c["FFMA"], c.total(), c["ISETP"]) for c in columns])
        # The form pass, S = (dG + mirror) / n_k: a thread's elements at fixed offsets from a
        # mask's two rows, at most 12 instructions an element (one FADD each); each element's
        # indices derived anew from its number took 34-37 (gpu-notes).
        forms = [c for c in counts if c["FADD"] and c["STS"] and not c["HMMA"] and not c["FFMA"]]
        assert forms and all(c.total() <= 12 * c["FADD"] for c in forms), (name, forms)
        # Each B fragment scaled by m_k^2 in one warp only (a warp takes all 64 output channels,
        # 4 m-tiles): one FMUL per B register (two per 16-bit pair) for 4 HMMAs, where two warps
        # of 32 channels each scaled the same fragments for 2 (gpu-notes, the MMA warps).
        scale = 0.5 if dtype == "f" else 1
        mma = [c for c in counts if c["HMMA"]]
        assert mma and all(c["FMUL"] <= scale * c["HMMA"] for c in mma), (name, mma)
        # S's A fragments by ldmatrix, one a fragment (16-bit input too: S formed as pairs of
        # the input type), so the only scalar loads of an iteration are its B words and mask
        # words, 3 per n-tile at most (were 4 per fragment as well in TF32), and the only
        # packing is the scaled B's, one F2FP per B register (16-bit input's S came as float
        # pairs, 4 LDS.64 and 4 F2FP a fragment).
        lean = [c["LDSM"] and 4 * c["LDS"] <= 3 * c["HMMA"] and 2 * c["F2FP"] <= c["HMMA"]
                for c in mma]  # fmt: skip
        assert all(lean), (name, [(c["LDSM"], c["LDS"], c["F2FP"], c["HMMA"]) for c in mma])
    simt = [ops for name, ops in kernels.items() if SIMT_BACKWARD_KERNEL.search(name)]
    assert len(simt) == 4 and not any(op.startswith("HMMA") for ops in simt for op in ops)
    # 4 variants x 2 dtypes x forward and backward, all spill-free (the nvcc test)
    assert len([name for name in kernels if PROBE_KERNEL.search(name)]) == 16
    # n_k's kernels (csrc/mask_mass_cuda.cu): no atomics (a fixed order of the sums); the
    # chunks' squares float64 products of their own, not contracted into FMAs (the CPU's
    # bits for float64 masks too; the other kernel's division is DFMA's Newton steps)
    mass = {name: ops for name, ops in kernels.items() if "mask_mass" in name}
    assert len(mass) == 6, sorted(mass)  # 4 input types' chunk sums, 2 accumulation types'
    assert not any(op.startswith(("ATOM", "RED")) for ops in mass.values() for op in ops), mass
    chunks = [ops for name, ops in mass.items() if "mask_mass_chunk" in name]
    assert len(chunks) == 4 and all(ops["DMUL"] and not ops["DFMA"] for ops in chunks), chunks


# The entry points that csrc/masked_gram_cuda_ops.cpp calls, by their header's signatures.
ENTRY_POINTS_CALLED = r"""
#include "mask_mass_cuda.h"
#include "masked_gram_cuda.h"
int main() {
  const CastGramShape shape{1, 1, 1, 1, 1, 1, 1, 1};
  const CastGramPlan plan = cast_masked_gram_cuda_plan(CastDtype::float32, shape, true, 90, 0);
  return cast_masked_gram_cuda_forward(CastDtype::float32, shape, plan, 0, 0, 0, 0, 0, 0, 0) +
         cast_masked_gram_cuda_backward(CastDtype::float32, shape, plan, 0, 0, 0, 0, 0, 0, 0, 0) +
         cast_inverse_mask_mass_cuda(CastDtype::float32, 1, 1, 0, 0, 0, 0);
}
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_parts_link(build_folder, tmp_path):
    """The parts link into one program with the entry points' callers: every launcher that
    some part or the entry points use is instantiated in one part. (The emulation builds the
    parts as one translation unit, which hides a missing one; torch's shared object would link
    without it and fail to load on the card, at `import cast`, every gpu-check step with it.)"""
    objects = []
    for source, result in compiled_all("sm_90", build_folder).items():
        assert result.returncode == 0, result.stderr
        objects.append(str(object_file(source, "sm_90", build_folder)))
    caller = tmp_path / "caller.cpp"
    caller.write_text(ENTRY_POINTS_CALLED)
    command = [NVCC, "-std=c++20", f"-I{CSRC}", str(caller), *objects, "-o", str(tmp_path / "a")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def cuda_include_dirs() -> list[str]:
    """The directories nvcc itself searches, as it reports them."""
    dry_run = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    lines = [line for line in dry_run.stderr.splitlines() if "INCLUDES=" in line]
    return [d for line in lines for d in re.findall(r'(?:-I|-isystem" ")"?([^" ]+)', line)]


TORCH_INCLUDE = pathlib.Path(torch.__file__).parent / "include"


@pytest.mark.skipif(NVCC is None or GXX is None, reason="needs nvcc and g++")
@pytest.mark.skipif(not (TORCH_INCLUDE / "c10" / "cuda").is_dir(), reason="no c10/cuda headers")
def test_cuda_glue_parses(tmp_path):
    # A CPU build of torch ships c10/cuda's headers but not this one, generated by CUDA builds;
    # its macros only matter when linking.
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n")
    includes = [
        TORCH_INCLUDE, TORCH_INCLUDE / "torch" / "csrc" / "api" / "include", tmp_path,
        *cuda_include_dirs(), sysconfig.get_paths()["include"],
    ]  # fmt: skip
    command = [
        GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
        *(f"-isystem{d}" for d in includes), str(CSRC / "masked_gram_cuda_ops.cpp"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


H100 = dict(compute_capability=90, max_smem=227 * 1024)
V100 = dict(compute_capability=70, max_smem=96 * 1024)  # no TF32
RTX_4090 = dict(compute_capability=89, max_smem=99 * 1024)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not installed")
    return cuda_emulation.build(tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture(scope="module")
def emulated_wgmma(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not installed")
    return cuda_emulation.build(tmp_path_factory.mktemp("cuda_emulation_wgmma"), wgmma=True)


@pytest.fixture(scope="module")
def emulated_late(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not installed")
    folder = tmp_path_factory.mktemp("cuda_emulation_late")
    return cuda_emulation.build(folder, late_copies=True)


@pytest.fixture(scope="module")
def emulated_wgmma_late(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not installed")
    folder = tmp_path_factory.mktemp("cuda_emulation_wgmma_late")
    return cuda_emulation.build(folder, late_copies=True, wgmma=True)


def run_emulated(
    lib, features, masks, kernels, grad, allow_tf32, machine, kernel_group=0, inv_mass=None,
    symmetric_scratch=-1,
):
    """What cast/ops.py and csrc/masked_gram_cuda_ops.cpp do around the launchers, on host
    tensors: ``1 / n_k`` as the op's entry forms it (or ``inv_mass``), dG in the accumulation
    dtype; the forward in the plan's groups of kernels, or in groups of ``kernel_group``; the
    backward with S whole in a scratch where the plan says (``symmetric_scratch`` -1), or
    where ``symmetric_scratch`` is 1 (0: formed a block at a time)."""
    B, C, H, W = features.shape
    (J, r, _), (Bm, K) = kernels.shape, masks.shape[:2]
    shape = (ctypes.c_int64 * 8)(B, C, H, W, Bm, K, J, r)
    code, acc = DTYPE_CODES[features.dtype], gram_dtype(features.dtype)
    machine = (ctypes.c_int64 * 3)(allow_tf32, machine["compute_capability"], machine["max_smem"])
    cuts = (ctypes.c_int64 * len(PLAN_FIELDS))()
    assert lib.emulated_plan(code, shape, machine, cuts), "the plan says unsupported"
    inv = canonical_inverse_mass(features, masks, None) if inv_mass is None else inv_mass
    scratch = torch.full((cuts[8], B, J, K, C, C), float("nan"), dtype=acc)
    gram = torch.full((B, J, K, C, C), float("nan"), dtype=acc)
    ptr = [t.data_ptr() for t in (features, masks, kernels, inv, scratch, gram)]
    group = ctypes.c_int64(kernel_group)
    assert lib.emulated_forward(code, shape, machine, group, *map(ctypes.c_void_p, ptr)) == 0

    grad = grad.to(acc).contiguous()
    d_features = torch.full_like(features, float("nan"))
    symmetric = torch.full_like(grad, float("nan"))
    ptr = [t.data_ptr() for t in (grad, inv, features, masks, kernels, symmetric, d_features)]
    which = ctypes.c_int64(symmetric_scratch)
    assert lib.emulated_backward(code, shape, machine, which, *map(ctypes.c_void_p, ptr)) == 0
    return gram, d_features, tuple(cuts)


def canonical_case(case, dtype):
    features, masks, kernels = case.inputs(dtype, "cpu", seed=CASES.index(case))
    if masks is None:
        masks = torch.ones(1, 1, case.H, case.W, dtype=dtype)
    return features, (masks if masks.dim() == 4 else masks[None]).contiguous(), kernels


def check_against_reference(lib, inputs, tol, allow_tf32=False, machine=H100):
    """Forward and backward against the reference; returns G and the plan's cuts."""
    features, masks, kernels = inputs
    f64, m64, p64 = features.double(), masks.double(), kernels.double()
    expected = masked_gram_reference(f64, m64, p64)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected_grad = masked_gram_backward_reference(grad, f64, m64, p64)
    gram, d_features, cuts = run_emulated(lib, *inputs, grad, allow_tf32, machine)
    assert torch.isfinite(gram).all() and torch.isfinite(d_features).all()
    assert relative_error(gram, expected) <= tol
    assert relative_error(d_features, expected_grad) <= tol
    assert torch.equal(gram, gram.transpose(-1, -2)), "G must be mirrored exactly"
    return gram, cuts


# (dtype, allow_tf32, SPEC §3 bound, whether the forward runs on tensor cores on an H100)
PRECISIONS = [
    (torch.float64, False, 1e-10, False),
    (torch.float32, False, 1e-5, False),
    (torch.float32, True, 3e-3, True),
    (torch.bfloat16, True, 2e-2, True),
    (torch.float16, True, 2e-2, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_emulated_kernels_match_reference(emulated, case):
    for dtype, allow_tf32, tol, tensor_cores in PRECISIONS:
        gram, cuts = check_against_reference(emulated, canonical_case(case, dtype), tol, allow_tf32)
        assert cuts[3] == tensor_cores and (cuts[7] > 0) == tensor_cores
        if case.masks == "empty":
            assert (gram[:, :, -1] == 0).all()


@pytest.mark.parametrize("allow_tf32,tol", [(False, 1e-5), (True, 3e-3)], ids=["simt", "tf32"])
def test_emulated_kernel_size_7(emulated, allow_tf32, tol):
    """r = 7 in float32, within the H100's shared memory (float64 stops at r = 5 there): the
    tensor-core forward drops to 4-row tiles, whose halo fits."""
    features, masks, kernels = Case("r=7", 1, 5, 11, 9, 2, 2, 7).inputs(torch.float32, "cpu", 7)
    inputs = (features, masks[None].contiguous(), kernels)
    _, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[4] == (4 if allow_tf32 else 2) and cuts[7] == (4 if allow_tf32 else 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_emulated_low_precision_size_7(emulated, dtype):
    """r = 7 in 16-bit input: the tensor-core backward on 4-row tiles at the widest halo, the one
    kernel where Z's words held in registers meet the n-tiles that repeat the last one."""
    features, masks, kernels = Case("r=7", 1, 5, 11, 9, 2, 2, 7).inputs(dtype, "cpu", 7)
    inputs = (features, masks[None].contiguous(), kernels)
    _, cuts = check_against_reference(emulated, inputs, 2e-2, True)
    assert cuts[7] == 4


@pytest.mark.parametrize("allow_tf32,tol", [(False, 1e-5), (True, 3e-3)], ids=["simt", "tf32"])
def test_emulated_kernel_size_9(emulated, allow_tf32, tol):
    """r = 9, the forward's widest kernel: its convolution's last case (convolve_odd's default);
    the backward takes it on CUDA cores."""
    features, masks, kernels = Case("r=9", 1, 3, 12, 10, 1, 2, 9).inputs(torch.float32, "cpu", 9)
    inputs = (features, masks[None].contiguous(), kernels)
    _, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[4] > 0 and cuts[7] == 0


@pytest.mark.parametrize("machine", [H100, V100], ids=["tensor cores", "no TF32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_emulated_low_precision(emulated, dtype, machine):
    case = next(c for c in CASES if c.label == "C=40 several channel tiles")
    _, cuts = check_against_reference(emulated, canonical_case(case, dtype), 2e-2, True, machine)
    assert cuts[3] == (machine is H100)


def random_inputs(B, C, H, W, J, K, r, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(B, C, H, W, generator=gen, dtype=dtype)
    masks = torch.rand(B, K, H, W, generator=gen, dtype=dtype)
    return features, masks, torch.randn(J, r, r, generator=gen, dtype=dtype)


@pytest.mark.parametrize("allow_tf32,tol", [(False, 1e-5), (True, 3e-3)], ids=["simt", "tf32"])
def test_emulated_splits_of_positions(emulated, allow_tf32, tol):
    """Tiles of 8 x 16 positions on tensor cores, 2 x 16 on SIMT; G holds split 0's sums, a
    scratch the others'. 9 tiles in 5 splits (SIMT 30 in 6) at B = 1, C = 8, the scratch's 4
    (5) copies of G within a tenth of inputs + outputs; at B = 2, 35 tiles one a split (SIMT:
    140 in 47 splits of 3). Interior tiles use every row of the backward's halo, also those on
    the last, partial, MMA tile. The grouping of kernels leaves G's bits as they are."""
    inputs = random_inputs(1, 8, 19, 37, 2, 2, 3)
    gram, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[0] == (5 if allow_tf32 else 6) and cuts[8] == cuts[0] - 1 and cuts[1] == 1
    grad = torch.zeros(1, 2, 2, 8, 8)
    paired, *_ = run_emulated(emulated, *inputs, grad, allow_tf32, H100, kernel_group=2)
    assert torch.equal(paired, gram)
    inputs = random_inputs(2, 16, 40, 100, 1, 1, 3)
    _, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[0] == (35 if allow_tf32 else 47)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_mma_backward_blocks(emulated, dtype):
    """The tensor-core backward over several blocks of everything: C = 72 is three blocks of 32
    input channels (the last partial) and two of 64 output channels, W = 40 three tiles across
    (16-byte copies of F in both dtypes, the last tile partial), own masks per batch item."""
    features, masks, kernels = (t.to(dtype) for t in random_inputs(2, 72, 11, 40, 2, 3, 3))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    _, cuts = check_against_reference(emulated, (features, masks, kernels), tol, True)
    assert cuts[7] == 8


@pytest.mark.parametrize(
    "dtype,C,allow_tf32",
    [(torch.float32, 70, True), (torch.bfloat16, 72, True), (torch.float32, 40, False)],
    ids=["tf32 C=70", "bfloat16 C=72", "simt"],
)
def test_emulated_backward_forms_s_from_dg(emulated, dtype, C, allow_tf32):
    """The backward takes dG and 1/n_k and forms S = (dG + dG^T)/n_k itself, a block at a time
    (on tensor cores: dG's block and its mirror by cp.async, added and scaled in shared memory):
    the very bits of reference.symmetric_grad's S, so dF is the one from S handed over whole (as
    dG = S/2 with 1/n_k = 1: S/2 + S/2 is S exactly). Own masks per batch item (1/n_k by batch
    and mask), dG far from symmetric; C = 70 is off whole 16-byte rows of dG (element-wise
    copies), both C end in a partial block of output channels."""
    features, masks, kernels = (t.to(dtype) for t in random_inputs(2, C, 11, 21, 2, 3, 3))
    grad = torch.randn(2, 2, 3, C, C, generator=torch.Generator().manual_seed(4))
    inv = canonical_inverse_mass(features, masks, None)
    _, d_features, cuts = run_emulated(emulated, features, masks, kernels, grad, allow_tf32, H100)
    assert cuts[3] == allow_tf32
    whole = symmetric_grad(grad, inv) / 2
    _, from_whole, _ = run_emulated(emulated, features, masks, kernels, whole, allow_tf32, H100,
                                    inv_mass=torch.ones_like(inv))  # fmt: skip
    assert torch.equal(d_features, from_whole)
    assert cuts[9] == 0  # these inputs are too small for S's scratch: a tenth of them is less
    # S whole in a scratch first (plan.symmetric_scratch; the SIMT backward has none): the
    # same bits, with no mirror copied and (float32) no form pass.
    _, from_scratch, _ = run_emulated(emulated, features, masks, kernels, grad, allow_tf32, H100,
                                      symmetric_scratch=1)  # fmt: skip
    assert torch.equal(from_scratch, from_whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_mirrors_outgrow_u(emulated, dtype):
    """dG's mirrors borrow U_j's region, as large as the larger: at r = 1 U_j takes 36 KiB (8 x
    16 positions) and the mirrors of K = 6 masks 54 KiB (f32; 51 KiB bf16), so the region is
    theirs and m_k^2 and the taps sit past it (in the emulation, writes past the block's shared
    memory fail the launch and reads there give NaN)."""
    inputs = tuple(t.to(dtype) for t in random_inputs(1, 40, 9, 20, 2, 6, 1))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    _, cuts = check_against_reference(emulated, inputs, tol, True)
    assert cuts[7] == 8


# A card whose shared memory holds the backward's 8-row tiles but not a region of its own for
# dG's mirrors at C = 72, J = K = 2: they borrow U_j's (f32 157256 B, 175688 with their own).
SHORT_SMEM = dict(compute_capability=90, max_smem=170 * 1024)


@pytest.mark.parametrize(
    "dtype,shape,machine",
    [
        (torch.float32, (1, 72, 9, 40, 2, 2, 3), H100),
        (torch.float32, (1, 72, 9, 40, 2, 2, 3), SHORT_SMEM),
        (torch.bfloat16, (1, 72, 9, 40, 2, 2, 3), H100),
        (torch.bfloat16, (1, 70, 9, 21, 2, 2, 3), H100),
        (torch.float32, (1, 24, 9, 20, 3, 1, 5), H100),
    ],
    ids=["tf32 C=72", "tf32 C=72 mirrors in U", "bfloat16 C=72", "bfloat16 C=70", "tf32 C=24 r=5"],
)
def test_emulated_copies_landing_late(
    emulated, emulated_late, emulated_wgmma_late, dtype, shape, machine
):
    """The cp.async copies landing as late as a GPU may (at their thread's wait, NaN in their
    destination from the issue): the very bits of copies landing at once, so no copy is read
    before its wait and a barrier, none issued into shared memory still being read (dG's
    mirrors: in a region of their own on an H100, issued with the rest of the next step's dG
    once this step's S is formed; in U_j's where shared memory is short, a kernel's first step's
    after the last kernel's adjoint), none left in flight when a block ends. Tensor-core
    forward (one split: a block walks 6 tiles, each next halo issued during the MMAs) and
    backward (12 items on 3 blocks, 2 kernels); C = 72: 3 input blocks and 2 output blocks,
    16-byte copies of F, the masks and dG, the mirrors in both places; C = 70, W = 21:
    element-wise copies of all three beside 16-byte zero fills; C = 24: one input block, every
    step a kernel's first. As built for sm_90a too, the wgmmas as late as the copies (read at
    their waits: Z, S's buffers and A sets not rewritten, nor copies landing there, before)."""
    features, masks, kernels = (t.to(dtype) for t in random_inputs(*shape))
    B, C, J, K = shape[0], shape[1], shape[4], shape[5]
    grad = torch.randn(B, J, K, C, C, generator=torch.Generator().manual_seed(3))
    gram, d_features, cuts = run_emulated(emulated, features, masks, kernels, grad, True, machine)
    assert cuts[3] == 1 and cuts[7] > 0  # tensor cores both ways: the kernels that copy so
    for lib in (emulated_late, emulated_wgmma_late):
        late_gram, late_d_features, _ = run_emulated(
            lib, features, masks, kernels, grad, True, machine
        )
        assert torch.equal(late_gram, gram) and torch.equal(late_d_features, d_features), lib
        # With S whole from a scratch: only S's blocks copied, one barrier fewer a step (f32).
        _, late_from_scratch, _ = run_emulated(
            lib, features, masks, kernels, grad, True, machine, symmetric_scratch=1
        )
        assert torch.equal(late_from_scratch, d_features), lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_f_halos_kept_across_kernels(emulated, emulated_late, dtype):
    """Where J > 1 and shared memory holds F's halo of every input block, the tensor-core
    backward copies each once an item and keeps it for every kernel j (plan.backward_f_resident),
    the next item's halo of a block issued once the last kernel has formed from it: the very bits
    of the halo copied once a kernel (on a card with a little less shared memory), with copies
    landing as late as a GPU may too. C = 40: two input blocks; 6 items on 3 blocks, so each
    block walks two and the next item's halos land during the last kernel's steps."""
    features, masks, kernels = (t.to(dtype) for t in random_inputs(1, 40, 9, 40, 3, 2, 3))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    _, cuts = check_against_reference(emulated, (features, masks, kernels), tol, True)
    plan = dict(zip(PLAN_FIELDS, cuts, strict=True))
    assert plan["backward_f_resident"] and plan["backward_rows"] == 8
    short = H100
    while plan["backward_f_resident"]:  # (with dG's mirrors in a region of their own, then not)
        short = dict(compute_capability=90, max_smem=plan["backward_smem"] - 1)
        plan = cuda_emulation.plan(emulated, dtype, (1, 40, 9, 40, 1, 2, 3, 3), True, **short)
    assert plan["backward_rows"] == 8
    grad = torch.randn(1, 3, 2, 40, 40, generator=torch.Generator().manual_seed(7))
    _, once_a_kernel, _ = run_emulated(emulated, features, masks, kernels, grad, True, short)
    for lib in (emulated, emulated_late):
        for scratch in (0, 1):
            _, kept, _ = run_emulated(lib, features, masks, kernels, grad, True, H100,
                                      symmetric_scratch=scratch)  # fmt: skip
            assert torch.equal(kept, once_a_kernel), (lib, scratch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_forward_tiles_per_split(emulated, dtype):
    """136 tiles of 8 x 16 positions in 46 splits: a forward block walks three tiles, each
    next tile's halo arriving while the last one's last MMAs run."""
    features, masks, kernels = (t.to(dtype) for t in random_inputs(1, 8, 136, 128, 2, 2, 3))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    _, cuts = check_against_reference(emulated, (features, masks, kernels), tol, True)
    assert cuts[0] == 46 and cuts[4] == 8


def test_emulated_groups_of_kernels_and_masks(emulated):
    """A forward block holds the Grams of at most 3 kernels x 3 masks in registers: J = K = 4
    runs in mask groups of 2, and, one channel-block pair and one split filling few SMs, in
    kernel groups of 1 (the plan's choice: more blocks). Each Gram's sum does not depend on
    its group: kernel groups of 2 and of 3 give the very same bits, and so do the first 3
    kernels and masks alone (one mask group of 3). C = 70: two channel blocks, so also a pair of
    different blocks (a < b). One split: the sums finish in place in G."""
    allow_tf32 = True
    features, masks, kernels = random_inputs(2, 70, 5, 9, 4, 4, 3)
    _, cuts = check_against_reference(emulated, (features, masks, kernels), 3e-3, allow_tf32)
    assert cuts[1:3] == (1, 2) and cuts[0] == 1 and cuts[8] == 0
    grad = torch.randn(2, 4, 4, 70, 70, generator=torch.Generator().manual_seed(1))
    grouped, *_ = run_emulated(emulated, features, masks, kernels, grad, allow_tf32, H100)
    for group in (2, 3):
        regrouped, *_ = run_emulated(emulated, features, masks, kernels, grad, allow_tf32, H100,
                                     kernel_group=group)  # fmt: skip
        assert torch.equal(regrouped, grouped), group
    first = (features, masks[:, :3].contiguous(), kernels[:3], grad[:, :3, :3])
    alone, _, alone_cuts = run_emulated(emulated, *first, allow_tf32, H100)
    assert alone_cuts[2] == 3
    assert torch.equal(grouped[:, :3, :3], alone)


@pytest.mark.parametrize(
    "dtype,shape,machine",
    [
        (torch.float32, (1, 72, 11, 21, 2, 3, 3), H100),  # two channel blocks: a < b as well
        (torch.float32, (2, 40, 9, 17, 2, 2, 1), H100),  # r = 1, masks per batch item
        (torch.float32, (1, 70, 12, 19, 2, 2, 5), H100),  # r = 5: 4 m-tiles in the backward
        (torch.float32, (1, 70, 13, 21, 2, 3, 3), H100 | dict(max_smem=160 * 1024)),  # 4 rows
        (torch.bfloat16, (2, 40, 9, 17, 3, 2, 5), H100),  # odd width, masks per batch item
        (torch.float16, (1, 130, 7, 19, 1, 1, 7), H100),  # three blocks, r = 7, one mask
        (torch.float16, (1, 70, 13, 21, 2, 3, 3), H100),  # the backward's 8-row r = 3 on wgmma
        (torch.bfloat16, (1, 70, 13, 21, 2, 1, 3), H100 | dict(max_smem=110 * 1024)),  # 4 rows
    ],
    ids=["tf32", "tf32-r1", "tf32-r5", "tf32-4-rows", "bfloat16", "float16", "float16-r3",
         "bfloat16-4-rows"],  # fmt: skip
)
def test_emulated_wgmma(emulated, emulated_wgmma, dtype, shape, machine):
    """The kernels as built for sm_90a (the forward on wgmma, B through Z's descriptor; the
    backward on wgmma where its halo fills whole m-tiles, B = S through a descriptor)
    against the reference, and bit for bit the Grams and dF of mma.sync's build, with S formed
    on load or whole in a scratch: both sum in the same order here (on a card the tensor cores
    may order a product's terms otherwise). The emulated wgmma reads B by the descriptor's
    fields as PTX defines them, so a wrong layout of Z or S, or a wrong leading or stride
    offset, gives wrong results here too."""
    inputs = tuple(t.to(dtype) for t in random_inputs(*shape, dtype=torch.float32))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    gram, cuts = check_against_reference(emulated_wgmma, inputs, tol, True, machine)
    assert cuts[3] == 1 and cuts[4] == (4 if machine is not H100 else 8)
    assert machine is H100 or cuts[7] == 4  # the backward's 4-row tiles (r = 3: on wgmma)
    grad = torch.randn(gram.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for scratch in (0, 1):
        on_wgmma = run_emulated(emulated_wgmma, *inputs, grad, True, machine,
                                symmetric_scratch=scratch)  # fmt: skip
        on_mma = run_emulated(emulated, *inputs, grad, True, machine, symmetric_scratch=scratch)
        assert torch.equal(on_wgmma[0], on_mma[0]) and torch.equal(on_wgmma[1], on_mma[1])


# One warpgroup's wgmmas (TF32) under the emulation, their operands rewritten between the issue
# and the wait; then the misuses that make a launch fail. Prints what thread 0 saw.
WGMMA_TIMING = r"""
#include <cstdio>
#include "masked_gram_mma.cuh"

// B (8 x 32, K-major, no swizzle): a core row 16 bytes of k, the next 4 k 128 bytes on, the
// next 8 n 256 bytes on: the first KiB of shared memory.
constexpr uint64_t kB = uint64_t{128 >> 4} << 16 | uint64_t{256 >> 4} << 32;
void operands(uint32_t (&a)[4], float a_value, float b_value) {
  __syncthreads();  // every wgmma before issued
  for (uint32_t& r : a) r = round_to_tf32(a_value);
  for (int i = threadIdx.x; i < 256; i += blockDim.x)
    reinterpret_cast<float*>(emulated_shared)[i] = b_value;
  __syncthreads();
}
template <class Body>
void launch(const char* name, Body body) {
  emulated_launch(dim3(1), dim3(128), 1024, nullptr, body);
  std::printf("%s_fault %d\n", name, cudaGetLastError());
}

int main() {
  launch("late", [] {  // each product 8 (k) terms: 8 A B
    float d[1][4][4] = {};
    uint32_t a[4];
    operands(a, 1.0f, 1.0f);
    wgmma_fence();
    wgmma_m64n32<float>(d[0], a, kB);
    wgmma_commit();
    const float issued = d[0][0][0];
    operands(a, 3.0f, 2.0f);  // both rewritten with the group in flight: it reads these
    wgmma_m64n32<float>(d[0], a, kB);
    wgmma_commit();
    wgmma_wait<1>();
    const float first = d[0][0][0];
    wgmma_wait<0>();
    wgmma_settled(d);
    if (threadIdx.x == 0)
      std::printf("issued %g\nfirst %g\nboth %g\n", issued, first, d[0][0][0]);
  });
  launch("unwaited", [] {
    float d[1][4][4] = {};
    uint32_t a[4];
    operands(a, 1.0f, 1.0f);
    wgmma_m64n32<float>(d[0], a, kB);
    wgmma_commit();
  });
  launch("uncommitted", [] {
    float d[1][4][4] = {};
    uint32_t a[4];
    operands(a, 1.0f, 1.0f);
    wgmma_m64n32<float>(d[0], a, kB);
    wgmma_wait<0>();
    wgmma_commit();
    wgmma_wait<0>();
  });
  launch("settled_early", [] {
    float d[1][4][4] = {};
    uint32_t a[4];
    operands(a, 1.0f, 1.0f);
    wgmma_m64n32<float>(d[0], a, kB);
    wgmma_commit();
    wgmma_settled(d);
    wgmma_wait<0>();
  });
  launch("held_early", [] {
    float d[1][4][4] = {};
    uint32_t a[4];
    operands(a, 1.0f, 1.0f);
    wgmma_m64n32<float>(d[0], a, kB);
    wgmma_commit();
    wgmma_hold(a);
    wgmma_wait<0>();
  });
}
"""


def test_emulated_wgmma_is_asynchronous(tmp_path):
    """The emulated wgmma happens as late as a GPU may do it, at the wait that its group's
    completion is guaranteed by: its accumulators unchanged until then, its A registers and B
    in shared memory read then (rewritten with the group in flight, the product is of the new
    values; a synchronous emulation gave 8, 56, 56), groups performed oldest first, all but
    wait_group's count. A block ending with a wgmma not waited for, a wait with one not
    committed, and accumulators settled or A held before their wgmma's wait make the launch
    fail, and nothing else does."""
    if GXX is None:
        pytest.skip("g++ is not installed")
    cuda_emulation.write_headers(tmp_path)
    (tmp_path / "timing.cpp").write_text(WGMMA_TIMING)
    command = [GXX, "-std=c++20", "-pthread", f"-I{tmp_path}", str(tmp_path / "timing.cpp"),
               "-o", str(tmp_path / "timing")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    output = subprocess.run([tmp_path / "timing"], check=True, capture_output=True, text=True)
    seen = {name: float(value) for name, value in map(str.split, output.stdout.splitlines())}
    assert seen == dict(
        issued=0, first=48, both=96, late_fault=0, unwaited_fault=1, uncommitted_fault=1,
        settled_early_fault=1, held_early_fault=1,
    )  # fmt: skip


def test_emulated_small_shared_memory_falls_back_to_simt(emulated):
    """Where the tensor-core forward does not fit even with 4-row tiles (99 KiB at r = 3), the
    SIMT one runs; at r = 1 the 4-row tensor-core tiles fit."""
    inputs = random_inputs(1, 40, 11, 19, 3, 3, 3)
    _, cuts = check_against_reference(emulated, inputs, 1e-5, True, RTX_4090)
    assert cuts[3] == 0 and cuts[4] == 2
    _, cuts = check_against_reference(
        emulated, random_inputs(1, 40, 11, 19, 1, 1, 1), 3e-3, True, RTX_4090
    )
    assert cuts[3] == 1 and cuts[4] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_narrow_tiles(emulated, dtype):
    """With less shared memory the tensor-core forward takes 4-row tiles: still the reference."""
    K = 3 if dtype == torch.float32 else 1  # the backward's tiles must fit too
    inputs = tuple(t.to(dtype) for t in random_inputs(1, 70, 13, 21, 2, K, 3))
    small = H100 | dict(max_smem=(160 if dtype == torch.float32 else 110) * 1024)
    _, cuts = check_against_reference(emulated, inputs, 3e-3 if dtype == torch.float32 else 2e-2,
                                      True, small)  # fmt: skip
    assert cuts[3] == 1 and cuts[4] == 4 and cuts[7] == 4


def test_emulated_tf32_rounds_to_nearest(emulated):
    """Non-negative features, as after a ReLU: TF32 operands truncated (what the tensor cores do
    with unrounded float32) would make every product low, about 5e-4 of G; rounded to nearest
    the errors cancel, well under 1e-4."""
    features, masks, kernels = random_inputs(1, 64, 16, 16, 1, 1, 1)
    inputs = (features.abs(), masks, kernels.abs())
    expected = masked_gram_reference(*(t.double() for t in inputs))
    grad = torch.zeros(expected.shape, dtype=torch.float64)
    gram, *_ = run_emulated(emulated, *inputs, grad, True, H100)
    assert relative_error(gram, expected) < 1e-4


def test_emulated_tf32_backward_rounds_to_nearest(emulated):
    """The backward's TF32 operands on non-negative data (S rounded once where it lands in
    shared memory, m_k^2 Z_j per fragment): S left truncated, dF came 3.5e-4 off; rounded to
    nearest the errors cancel, under 5e-5."""
    features, masks, kernels = random_inputs(1, 64, 16, 16, 1, 1, 3)
    inputs = (features.abs(), masks, kernels.abs())
    grad = torch.rand(1, 1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = masked_gram_backward_reference(grad, *(t.double() for t in inputs))
    _, d_features, _ = run_emulated(emulated, *inputs, grad.double(), True, H100)
    assert relative_error(d_features, expected) < 5e-5


# (Bm, K, H, W) of the masks, by why they are there: one position; more than one chunk of
# 8192 positions, the last one part full, masks of their own per batch item, and enough of
# them that float64's bits see the order of the sums (lanes added in adjacent pairs change 8 of
# these 32 masks' bits, none of 4)
MASS_SHAPES = {"minimal": (1, 1, 1, 1), "chunks and a part, own masks": (2, 16, 97, 101)}


@pytest.mark.parametrize("dtype", backends.FLOAT_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", MASS_SHAPES.values(), ids=MASS_SHAPES.keys())
def test_emulated_inverse_mask_mass_is_the_cpu_ops_bits(emulated, dtype, shape):
    """csrc/mask_mass_cuda.cu's two kernels give the CPU op's bits (csrc/mask_mass.h's order,
    which tests/test_masked_gram.py holds to the float64 sum), an empty mask 0; its partial
    sums, in shared memory poisoned with NaN, are written before they are read."""
    if not backends.compiled_op("_inverse_mask_mass", "cpu"):
        pytest.skip("the compiled extension is not built")
    masks = torch.rand(shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    masks[:, -1, : (shape[2] + 1) // 2] = 0  # the last mask's top half empty (all of it at H = 1)
    masks = masks.to(dtype)
    planes, positions = shape[0] * shape[1], shape[2] * shape[3]
    partials = torch.full((planes * emulated.emulated_mass_chunks(ctypes.c_int64(positions)),),
                          float("nan"), dtype=torch.float64)  # fmt: skip
    inverse = torch.full(shape[:2], float("nan"), dtype=gram_dtype(dtype))
    code = emulated.emulated_inverse_mask_mass(
        DTYPE_CODES[dtype], ctypes.c_int64(planes), ctypes.c_int64(positions),
        *(ctypes.c_void_p(t.data_ptr()) for t in (masks, partials, inverse)),
    )  # fmt: skip
    assert code == 0
    assert torch.equal(inverse, torch.ops.cast._inverse_mask_mass(masks))
    if shape[2] == 1:
        assert (inverse == 0).all()


# relu<b>_1 of VGG-19 (the bench's layers): channels, and the grid as a fraction of the image
VGG_STYLE_LAYERS = [("relu1_1", 64, 1), ("relu2_1", 128, 2), ("relu3_1", 256, 4),
                    ("relu4_1", 512, 8), ("relu5_1", 512, 16)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_plan_for_vgg_layers(emulated, dtype):
    """On an H100, every VGG style layer of 1024^2 and 4096^2 images at r = 3, J = K = 1 and 3,
    gets the tensor-core kernels with 8-row tiles within 227 KiB, and the forward's scratch
    (the partial Grams of splits 1, 2, ..., G holding split 0's) is within a tenth of the op's
    inputs + outputs as the bench counts them (issue 9's target: F, the masks, the kernels and
    dG in, G and dF out); at C = 512 of a 1024^2 image at J = K = 3 that is no scratch at all
    (one split, the blocks from the kernels in groups of one). The backward's S goes whole into
    a scratch of G's size exactly where that is within the same tenth: at J = K = 3 relu1_1 -
    relu3_1 of a 1024^2 image and every layer of a 4096^2 one, not relu4_1 and relu5_1 of a
    1024^2 image; it keeps F's halo of every input block across the kernels at relu1_1 (J = 3),
    the only layer where they fit."""
    for image in (1024, 4096):
        for name, C, fraction in VGG_STYLE_LAYERS:
            size = image // fraction
            for J in (1, 3):
                shape = (1, C, size, size, 1, J, J, 3)
                plan = cuda_emulation.plan(emulated, dtype, shape, True, **H100)
                where = (image, name, J, plan)
                assert plan["tensor_cores"] and plan["tile_rows"] == 8, where
                assert plan["backward_rows"] == 8 and plan["mask_group"] == J, where
                assert max(plan["forward_smem"], plan["backward_smem"]) <= 227 * 1024, where
                gram = J * J * C * C * 4  # G and dG, float32
                inputs_outputs = (2 * C + J) * size * size * dtype.itemsize + 2 * gram
                assert plan["scratch_grams"] * gram <= 0.1 * inputs_outputs, where
                assert plan["symmetric_scratch"] == (gram <= 0.1 * inputs_outputs), where
                if J == 3:
                    assert plan["symmetric_scratch"] == (image == 4096 or C <= 256), where
                # F's halos kept across the kernels where they fit: two input blocks at C = 64
                assert plan["backward_f_resident"] == (J > 1 and C == 64), where
                if (image, C, J) == (1024, 512, 3):
                    assert plan["splits"] == 1 and plan["kernel_group"] == 1, where


def test_gpu_checks_take_the_backward_ways_they_name(emulated):
    """The card's checks of the tensor-core backward's copies, tests/test_gpu.py's
    every-element cases and bench/gpu_sanitize.py's (under compute-sanitizer), take the ways
    they are named for on an H100's plan: S formed a block at a time with dG's mirrors in a
    region of their own (shared memory beyond the same kernel's without one, as with S from a
    scratch) or in U_j's, or S whole from a scratch; and F's halos kept across the kernels
    (bfloat16 at K = 3, one card case). When the plan took the scratch for shapes
    of the size a tenth of whose inputs + outputs holds S, all of them went that way, and no
    mirror was copied on the card any more."""
    import gpu_sanitize  # bench/
    import test_gpu

    def way(dtype, K, B, H, Bm):
        plan = cuda_emulation.plan(emulated, dtype, (B, 72, H, 128, Bm, K, 3, 3), True, **H100)
        whole = cuda_emulation.plan(emulated, dtype, (1, 72, 1024, 1024, 1, K, 3, 3), True, **H100)
        assert plan["backward_rows"] == whole["backward_rows"] == 8 and whole["symmetric_scratch"]
        kept = plan["backward_f_resident"]
        assert kept == whole["backward_f_resident"]  # so that their shared memory compares
        own = plan["backward_own_mirrors"]
        if plan["symmetric_scratch"]:
            assert not own  # nothing is mirrored
            return "F kept, " * kept + "S from a scratch"
        assert own == (plan["backward_smem"] > whole["backward_smem"])  # the region's bytes
        return "F kept, " * kept + ("own mirrors" if own else "mirrors in U")

    for name, (dtype, K, B, H) in test_gpu.EVERY_ELEMENT_CASES.items():
        assert name.endswith(way(dtype, K, B, H, B)), name
    sanitized = [way(dtype, K, B, H, 1) for dtype, K, B, H in gpu_sanitize.CASES]
    assert sanitized == ["own mirrors", "mirrors in U", "mirrors in U", "S from a scratch"]


def test_bench_memory_model_takes_the_cuda_plan():
    """``bench/bench_masked_gram.py --memory-model`` predicts the CUDA backend's extra memory from
    the plan itself (built for this CPU): at relu4_1 of a 1024^2 image, J = K = 3, float32, the
    forward finishes in G (no scratch) and the backward forms S a block at a time, so nothing
    is left (n_k's float64 band, 0.38 MiB, went with csrc/mask_mass_cuda.cu); at relu2_1 the
    forward's 43 scratch copies of G (44 splits), 24.19 MiB."""
    bench = CSRC.parent / "bench" / "bench_masked_gram.py"
    argv = [sys.executable, str(bench), "--memory-model", "--image", "1024", "--jk", "3x3"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[2].strip(): line.split("|") for line in done.stdout.splitlines()
            if line.startswith("| 1024 |")}  # fmt: skip
    header = next(line for line in done.stdout.splitlines() if line.startswith("| image |"))
    cuda = [cell.strip() for cell in header.split("|")].index("cuda model extra MiB")
    assert rows["relu4_1"][cuda].strip() == "0.00" and rows["relu2_1"][cuda].strip() == "24.19"
