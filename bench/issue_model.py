"""Where the fused kernels' time should go on an H100: an issue-rate model, no GPU needed.

The roofline of ``bench_masked_gram.py`` bounds the op by its matmul flops and its DRAM bytes;
the Triton kernels also form ``Z_j = P_j F`` with ``r^2`` shifted loads (L1/L2 hits) and
CUDA-core multiply-adds, which that bound does not see. This counts, per layer, the work of
each kind the kernels issue (their loop structure, ``kernels/masked_gram.py``) and divides by
the card's rate for it: tensor-core FMAs at the measured TF32 ``torch.mm`` peak, CUDA-core FMAs,
and L1 wavefronts (128 bytes per SM and clock; a warp's 32-bit load of 32 positions is one).
The slowest kind bounds the kernel. ``bench/results/gpu-notes.md`` compares it with what was
measured.

The CUDA forward (``csrc/masked_gram_cuda_kernels.cuh``) reads its operands from shared memory it
filled itself, so it is counted in shared-memory wavefronts (128 bytes per SM and clock, conflicts
included), warp instructions issued (4 per SM and clock) and DRAM bytes, beside its MMAs.

    python bench/issue_model.py            # 1024^2, J = K = 3, r = 3, float32
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# H100 SXM: 132 SMs at 1.83 GHz; 128 float32 FMA lanes and one 128-byte L1 wavefront per SM
# and clock; the TF32 rate is the torch.mm peak measured on 2026-11-26 (400 TFLOP/s).
SMS, CLOCK = 132, 1.83e9
CUDA_FMA_PER_S = SMS * 128 * CLOCK
L1_WAVEFRONTS_PER_S = SMS * CLOCK
MMA_FMA_PER_S = 400e12 / 2
BF16_MMA_FMA_PER_S = 788e12 / 2  # the bf16 torch.mm peak measured the same day
ISSUE_PER_S = SMS * 4 * CLOCK  # four schedulers, one warp instruction each per clock
DRAM_BYTES_PER_S = 2.84e12  # the copy measured the same day
# The CUDA kernels run one 256-thread block per SM (their registers allow no second): 8 warps,
# two a scheduler, too few to hide a warp's own dependent waits. A shared-memory load takes
# about 33 clocks to return, a float multiply-add 4.
RESIDENT_WARPS, LDS_LATENCY, FMA_LATENCY = 8, 33, 4
BLOCK_C = 64  # the channel block of every shipped config for C >= 64


@dataclass
class Work:
    mma: float = 0.0  # tensor-core FMAs
    fma: float = 0.0  # CUDA-core FMAs and multiplies
    loads: float = 0.0  # 32-bit thread loads from L1/L2 (a 128-bit load counts four)
    issue: float = 0.0  # warp instructions, where counted
    dram: float = 0.0  # bytes from and to DRAM, where counted
    chain: float = 0.0  # clocks warps wait on their own dependent loads, summed over warps
    mma_rate: float = MMA_FMA_PER_S

    def seconds(self) -> dict[str, float]:
        return dict(
            mma=self.mma / self.mma_rate,
            fma=self.fma / CUDA_FMA_PER_S,
            l1=self.loads / 32 / L1_WAVEFRONTS_PER_S,
            issue=self.issue / ISSUE_PER_S,
            dram=self.dram / DRAM_BYTES_PER_S,
            latency=self.chain / (SMS * RESIDENT_WARPS * CLOCK),
        )


def forward(N: int, C: int, J: int, K: int, r: int) -> Work:
    """A program per (kernel, channel-block pair a <= c, band of rows): Z_a and Z_c formed per
    pair (once when a == c), all K masks (K <= 4) from that one formation. F's loads are
    coalesced (a warp's load of a tap takes 32 consecutive positions of one channel), so each is
    one wavefront; a shifted tap straddling two lines takes two, which this does not count."""
    blocks = max(1, C // BLOCK_C)
    pairs = blocks * (blocks + 1) // 2
    formed = J * N * BLOCK_C * blocks * blocks  # nb diagonal pairs once, the others twice
    return Work(
        mma=J * K * pairs * BLOCK_C**2 * N,
        fma=formed * r * r + J * K * pairs * BLOCK_C * N,
        loads=formed * r * r,
    )


def backward_stencil(N: int, C: int, J: int, K: int, r: int) -> Work:
    """The design replaced in issue 9: a (2r-1)^2 stencil per mask, per block of output
    channels, its weights rebuilt from r^2 products per tap (32 reduction channels a block)."""
    span, blocks = (2 * r - 1) ** 2, max(1, C // BLOCK_C)
    stencil = J * K * N * C * blocks * span
    return Work(
        mma=J * K * N * C * C, fma=stencil + J * K * N * (C / 32) * blocks * span * r * r,
        loads=stencil,
    )  # fmt: skip


def backward_tiled(N: int, C: int, J: int, K: int, r: int, tile: int = 16) -> Work:
    """Issue 9's design: U_j on a tile x tile tile with halo (the inner part written), Z_j once
    per block of output channels, U_j and dF's accumulator through scratch in 128-bit moves."""
    halo = (tile / (tile - 2 * (r // 2))) ** 2
    blocks = max(1, C // BLOCK_C)
    formed = J * N * halo * C * blocks
    return Work(
        mma=J * K * N * halo * C * C,
        fma=formed * (r * r + K) + J * N * halo * C * r * r,
        loads=formed * r * r + J * N * halo * C * (r * r + 3),
    )


def cuda_forward(N: int, C: int, J: int, K: int, r: int, size: int = 4) -> Work:
    """The CUDA forward: per (channel-block pair, tile of 8 x 16 positions) F's haloed tile goes
    to shared memory once (16-byte loads, columns padded to whole vectors), Z_j is formed there
    for each kernel (a column of 8 outputs per thread), and each warp multiplies its 16 x 32
    piece of the J x K Grams with mma.sync, A and B fragments read once per step for all masks
    (J, K <= 3 per block). ``size``: bytes per input element (4 TF32, 2 bf16)."""
    tile_rows, cols, P, warps = 8, 16, 128, 8
    h = r // 2
    halo_rows, halo_cols = tile_rows + 2 * h, cols + 2 * max(16 // size, 4)
    blocks = max(1, -(-C // BLOCK_C))
    diagonal, off = blocks, blocks * (blocks - 1) // 2
    tiles = N / P
    kg, mg = min(J, 3), min(K, 3)  # kernels and masks per block
    groups = -(-J // kg) * -(-K // mg)
    wavefronts = issue = fma = 0.0
    for channels, pairs in ((BLOCK_C, diagonal), (2 * BLOCK_C, off)):
        units = pairs * tiles * groups
        halo = channels * halo_rows * halo_cols * size / 128  # STS.128: 4 wavefronts a warp
        issue_halo = channels * halo_rows * halo_cols * size / 16 / 32 * 6  # LDG, STS, address
        warp_items = channels * cols / 32  # a warp: 16 columns x 2 channels
        form_lds = warp_items * (r * halo_rows + r * r)  # column values, broadcast taps
        form_ffma = warp_items * tile_rows * r * r
        z_store = warp_items * tile_rows * 2  # 2-way conflict between a warp's two channels
        rounding = warp_items * tile_rows * (4 if size == 4 else 1)
        step = 8 if size == 4 else 16
        steps = P // step
        mma_lds = warps * steps * (12 + (2 if size == 4 else 4) * mg)
        scaling = warps * steps * 4 * mg * (5 if size == 4 else 6)
        hmma = warps * steps * 4 * mg
        per_kernel_wavefronts = form_lds + z_store + mma_lds
        per_kernel_issue = form_lds + form_ffma + z_store + rounding + mma_lds + scaling + hmma
        wavefronts += units * (halo + kg * per_kernel_wavefronts)
        issue += units * (issue_halo + kg * per_kernel_issue)
        fma += units * kg * form_ffma * 32
    return Work(
        mma=J * K * blocks * blocks * BLOCK_C**2 * N,  # full 64 x 64 Grams, diagonal included
        fma=fma,
        loads=32 * wavefronts,
        issue=issue,
        dram=blocks * N * C * size + K * N * size + J * K * C * C * 4 * 2,
        mma_rate=MMA_FMA_PER_S if size == 4 else BF16_MMA_FMA_PER_S,
    )


def cuda_backward(N: int, C: int, J: int, K: int, r: int, size: int = 4) -> Work:
    """The CUDA backward (its old structure, mma.sync since issue 9): a block per (tile of 8 x 16
    outputs, 32 output channels); per kernel and block of 32 input channels F's 2h-halo in scalar
    loads, Z_j on the h-halo (r^2 loads and FMAs per value), m_k^2 Z_j stored for every k (4-way
    bank conflicts), U_j += W S with mma.sync through shared memory; the adjoint once per kernel
    (its U_j reads 8-way conflicted: row stride 40 words)."""
    h = r // 2
    u_size, f_size = (8 + 2 * h) * (16 + 2 * h), (8 + 4 * h) * (16 + 4 * h)
    rows = -(-u_size // 16) * 16
    blocks = max(1, -(-C // 32))
    units = N / 128 * blocks * J  # (tile, output block, kernel)
    step = 8 if size == 4 else 16
    per_input_block = dict(
        f_wavefronts=32 * f_size / 32,
        f_issue=32 * f_size / 32 * 12,  # a division, bounds, the load, a store per element
        form_wavefronts=32 * u_size / 32 * (r * r + r * r / 32 + 4 * K),  # W stores 4-way
        form_issue=32 * u_size / 32 * (3 * r * r + 3 * K),
        mma_wavefronts=rows / 16 * (K * 32 / step * 12 + 2 * 2 * 4),
        mma_issue=rows / 16 * (K * 32 / step * (12 + 4) + 2 * 16),
    )
    adjoint = 128 * 32 / 32 * r * r * 2  # per output: r^2 U loads (conflict-free), r^2 taps
    wavefronts = units * (
        blocks * sum(v for k, v in per_input_block.items() if "wavefronts" in k) + 8 * adjoint / 2
    )
    issue = units * (blocks * sum(v for k, v in per_input_block.items() if "issue" in k) + adjoint)
    return Work(
        mma=J * K * N * rows / 128 * C * blocks * 32,
        fma=units * (blocks * 32 * u_size * r * r + 128 * 32 * r * r),
        loads=32 * wavefronts,
        issue=issue,
        dram=N * C * size * (blocks + 1),
        mma_rate=MMA_FMA_PER_S if size == 4 else BF16_MMA_FMA_PER_S,
    )


def cuda_backward_chain(N: int, C: int, J: int, K: int, r: int, size: int = 4) -> Work:
    """The CUDA backward of issue 9's redesign: a block per (tile of 8 x 16 outputs, 64 output
    channels); per kernel j and block of 32 input channels, F's 2h-halo and the block of every
    S_jk arrive by cp.async (16 bytes), Z_j is formed on the h-halo once (a column of 4 values
    per thread, each loaded value used for up to r of them), and U_j^T = [S_j1 .. S_jK]
    [m_1^2 Z_j; ..; m_K^2 Z_j]^T is one mma.sync chain K * C deep, held in registers (m_k^2
    applied to the B fragments); U_j goes to shared memory once per kernel and the adjoint
    convolution reads it once per output (a column of 8 per thread, dF in registers)."""
    h = r // 2
    u_rows, u_cols, f_rows = 8 + 2 * h, 16 + 2 * h, 8 + 4 * h
    f_cols = 16 + 2 * (-(-2 * h // (16 // size)) * (16 // size))
    u_size = u_rows * u_cols
    n_tiles = -(-u_size // 32) * 4  # 8 positions each, 4 warps across
    out_blocks, in_blocks = -(-C // 64), -(-C // 32)
    units = N / 128 * out_blocks * J * in_blocks  # (tile, output block, kernel, input block)
    step, per = (8, 1) if size == 4 else (16, 2)
    loads_bytes = 32 * f_rows * f_cols * size + K * 64 * 32 * 4
    chunks = -(-u_rows // 4)
    form_items = 32 * 24 * chunks / 32  # warps of (channel, column, 4 rows); 24 columns
    form_lds = form_items * ((4 + 2 * h) * r)  # conflict-free column values; taps broadcast

    # A column of a convolution (r a template argument of the kernel): its rows and
    # taps issue together, about 3 instructions a load (address, bound, load), then the
    # multiply-adds; one shared-memory round trip and an r-deep FMA chain per column. About 90
    # more per formation item (its indices, the 4 stores). sm_90 SASS at r = 3: 52 / 60
    # instructions per column of the formation / adjoint (116 / ~110 with r at run time).
    def column_issue(rows: int, outs: int) -> float:
        return 3 * (rows + r) + outs * r

    column_chain = LDS_LATENCY + r * FMA_LATENCY
    form_issue = form_items * (r * column_issue(4 + 2 * h, 4) + 90)
    form_chain = form_items * r * column_chain
    k_steps = 32 // step
    warp_step = dict(  # per warp, k-step: 2 m-tiles x n_tiles / 4 n-tiles, K masks
        a=2 * 4 * K * per, b=2 * n_tiles / 4, m=K * n_tiles / 4, hmma=K * 2 * n_tiles / 4
    )
    mma_lds = 8 * k_steps * (warp_step["a"] + warp_step["b"] + warp_step["m"])
    # Per warp, k-step and mask, the SASS (n-tiles up to 8 unrolled): 175 instructions TF32
    # (16 LDS, 16 HMMA, 21 warp-uniform branches on n_tiles, cvt.rna.tf32 as FSETP + IADD +
    # LOP3 per value), 189 bf16 (SHF / FMUL / F2FP to scale the packed pairs). Measured on the
    # H200 (probe, whole - no MMA, 12 / 6 such iterations a step): about 1000 clocks each per
    # SM, 3x their issue and 6x the tensor pipe, so a latency chain that two warps a scheduler
    # do not hide; calibrated, not derived.
    mma_issue = 8 * k_steps * K * (175 if size == 4 else 189)
    mma_chain = 8 * k_steps * K * 1000
    per_kernel = dict(  # per (tile, output block, kernel): U_j out, adjoint in
        u_store=64 * n_tiles * 8 / 32 * 2,  # float2 stores, 2-way
        adjoint_lds=64 * 16 / 32 * (8 + 2 * h) * r,
        adjoint_issue=64 * 16 / 32 * r * column_issue(8 + 2 * h, 8),
        adjoint_chain=64 * 16 / 32 * r * column_chain,
    )
    wavefronts = units * (loads_bytes / 128 + form_lds + form_items * 4 + mma_lds)
    wavefronts += units / in_blocks * (per_kernel["u_store"] + per_kernel["adjoint_lds"])
    issue = units * (loads_bytes / 16 / 32 * 3 + form_issue + mma_issue)
    issue += units / in_blocks * (per_kernel["u_store"] + per_kernel["adjoint_issue"])
    chain = units * (form_chain + mma_chain) + units / in_blocks * per_kernel["adjoint_chain"]
    return Work(
        mma=J * K * N / 128 * n_tiles * 8 * C * out_blocks * 64,
        fma=units * 32 * u_size * r * r + J * N * C * r * r,
        loads=32 * wavefronts,
        issue=issue,
        dram=N * C * size * (out_blocks + 1) + N * K * size,
        mma_rate=MMA_FMA_PER_S if size == 4 else BF16_MMA_FMA_PER_S,
        chain=chain,
    )


def triton_seconds(N: int, C: int, J: int, K: int, r: int = 3) -> float:
    """The model's bound for the shipped Triton forward + backward (``bench_masked_gram``
    prints it beside the measured time)."""
    return sum(max(d(N, C, J, K, r).seconds().values()) for d in (forward, backward_tiled))


def cuda_seconds(N: int, C: int, J: int, K: int, r: int = 3, size: int = 4) -> float:
    """The model's bound for the CUDA forward + backward (``size``: bytes per input element)."""
    designs = (cuda_forward, cuda_backward_chain)
    return sum(max(d(N, C, J, K, r, size=size).seconds().values()) for d in designs)


def main() -> None:
    from bench_masked_gram import style_layers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("-J", type=int, default=3)
    parser.add_argument("-K", type=int, default=3)
    parser.add_argument("-r", type=int, default=3)
    args = parser.parse_args()
    designs = [("triton forward", forward), ("triton backward, stencil", backward_stencil)]
    designs.append(("triton backward, tiled", backward_tiled))
    designs.append(("cuda forward, TF32", cuda_forward))
    designs.append(("cuda forward, bf16", lambda *shape: cuda_forward(*shape, size=2)))
    designs.append(("cuda backward, TF32", cuda_backward))
    designs.append(("cuda backward, bf16", lambda *shape: cuda_backward(*shape, size=2)))
    designs.append(("cuda backward chain, TF32", cuda_backward_chain))
    designs.append(("cuda backward chain, bf16", lambda *s: cuda_backward_chain(*s, size=2)))
    print(f"{args.image}^2, J={args.J}, K={args.K}, r={args.r}, float32 (TF32), H100 model\n")
    print("| layer | kernel | MMA ms | CUDA-core ms | L1/smem ms | issue ms | DRAM ms | latency ms "
          "| bound ms |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for layer in style_layers(args.image):
        for name, design in designs:
            times = design(layer.N, layer.C, args.J, args.K, args.r).seconds()
            cells = " | ".join(f"{1e3 * t:.2f}" for t in times.values())
            print(f"| {layer.name} | {name} | {cells} | {1e3 * max(times.values()):.2f} |")


if __name__ == "__main__":
    main()
