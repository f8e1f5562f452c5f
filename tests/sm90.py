"""Compile CAST's Triton kernels for an H100 (sm_90a) without a GPU and read the machine code.

Triton's compiler and the ``cuobjdump`` it ships run on any machine, so what a GPU engineer
reads off a kernel before running it — registers, spilled bytes, shared memory, which matrix
instructions and how wide the global loads are — is checked here, for every shipped config.

    python tests/sm90.py            # a table for every shipped config and dtype

``tests/test_triton_kernels.py`` asserts the design's promises on these reports.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from cast.kernels import masked_gram as mg
from cast.kernels.utils import TRITON_DTYPES, dot_constexprs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024  # the opt-in maximum per block on sm_90
_NAMES = {tl.float16: "fp16", tl.bfloat16: "bf16", tl.float32: "fp32", tl.float64: "fp64"}
# Pointers to float32 (float64 for float64 input) accumulators rather than to input-dtype data.
_ACCUMULATOR_POINTERS = {"inv_mass_ptr", "out_ptr", "grad_ptr", "scratch_ptr"}
ALIGNED = {"C", "H", "W", "N"}  # sizes a launch may find to be multiples of 16
# (input dtype, allow_tf32): each precision path the launchers can take (kernels/utils.py).
DTYPES = [
    (torch.float32, True),
    (torch.float32, False),
    (torch.bfloat16, True),
    (torch.float16, True),
    (torch.float64, True),
]


@dataclass(frozen=True)
class Report:
    kernel: str
    dtype: str
    precision: str
    config: str
    registers: int
    spilled_bytes: int  # local memory per thread: stack frame and spills
    shared_bytes: int
    instructions: collections.Counter
    # (shape, sizePerThread, threadsPerWarp) of each 2-D global load in the TTGIR: which
    # elements a thread holds and how a warp's lanes spread over the tile
    load_layouts: tuple[tuple[tuple[int, ...], ...], ...] = ()

    def count(self, pattern: str) -> int:
        """How many SASS instructions match ``pattern`` (a regex on the opcode)."""
        return sum(n for op, n in self.instructions.items() if re.fullmatch(pattern, op))


def _signature(kernel, dtype, constexprs):
    accumulator = tl.float64 if dtype == tl.float64 else tl.float32

    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*" + _NAMES[accumulator if name in _ACCUMULATOR_POINTERS else dtype]
        return "i32"

    return {name: kind(name) for name in kernel.arg_names}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_for_sm90(
    kernel,
    dtype: torch.dtype,
    allow_tf32: bool,
    config: triton.Config,
    R=3,
    num_masks=3,
    aligned_sizes=True,
) -> Report:
    """Compile ``kernel`` with ``config`` for sm_90a and read its resources and SASS."""
    constexprs = dict(config.kwargs, R=R, WIDE_OFFSETS=False, **dot_constexprs(dtype, allow_tf32))
    if "NUM_MASKS" in kernel.arg_names:
        constexprs["NUM_MASKS"] = num_masks
    if "CHANNELS_ALIGNED" in kernel.arg_names:  # as the launcher sets it from C
        constexprs["CHANNELS_ALIGNED"] = aligned_sizes
    precision = constexprs["INPUT_PRECISION"]
    dtype = TRITON_DTYPES[dtype]
    signature = _signature(kernel, dtype, constexprs)
    # What a launch tells the compiler (Triton specialises on it): tensors 16-byte aligned, as
    # torch allocates them, and with aligned_sizes the sizes that are multiples of 16 at every
    # VGG layer of an image whose sides are multiples of 256. Alignment widens loads.
    aligned = [
        i
        for i, name in enumerate(signature)
        if name.endswith("_ptr") or (aligned_sizes and name in ALIGNED)
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(kernel, signature, constexprs, attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = triton.compile(source, target=TARGET, options=options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    resources = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    opcode = r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Za-z0-9_.]*)"
    opcodes = re.findall(opcode, sass, re.M)
    return Report(
        kernel=kernel.__name__,
        dtype=_NAMES[dtype],
        precision=precision,
        config=f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}",
        registers=int(resources["REG"]),
        spilled_bytes=int(resources["STACK"]) + int(resources["LOCAL"]),
        shared_bytes=compiled.metadata.shared,
        instructions=collections.Counter(opcodes),
        load_layouts=_load_layouts(compiled.asm["ttgir"]),
    )


def _load_layouts(ttgir: str) -> tuple:
    """The blocked layouts of the 2-D tensors of pointers that loads and asynchronous copies
    read."""
    layouts = {
        name: tuple(tuple(int(n) for n in re.search(rf"{key} = \[([\d, ]+)\]", body)[1].split(","))
                    for key in ("sizePerThread", "threadsPerWarp"))
        for name, body in re.findall(r"^#(\w+) = #ttg\.blocked<\{([^}]*)\}>", ttgir, re.M)
    }  # fmt: skip
    loads = (
        r"(?:tt\.load|ttg\.async_copy_global_to_local) [^\n]*"
        r": tensor<(\d+)x(\d+)x!tt\.ptr<\w+>, #(\w+)>"
    )
    return tuple(
        ((int(rows), int(cols)), *layouts[name]) for rows, cols, name in re.findall(loads, ttgir)
    )


def shipped():
    """Every (kernel, config) the autotuner may launch."""
    for config in mg.FWD_CONFIGS:
        yield mg._masked_gram_fwd_kernel, config
    for config in mg.BWD_CONFIGS:
        yield mg._masked_gram_bwd_kernel, config


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90a", flush=True)
    for kernel, config in shipped():
        for dtype, allow_tf32 in DTYPES:
            r = compile_for_sm90(kernel, dtype, allow_tf32, config)
            mma = {op: n for op, n in r.instructions.items() if "MMA" in op}
            loads = {op: n for op, n in r.instructions.items() if op.startswith("LDG")}
            print(
                f"{r.kernel[13:16]} {r.dtype} {r.precision:4} {r.config}: reg {r.registers} "
                f"spill {r.spilled_bytes} B smem {r.shared_bytes} B {mma} {loads}",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
