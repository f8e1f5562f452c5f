"""sm_90 SASS as ``cuobjdump -sass`` lists it: each instruction with the registers it reads and
writes, and the innermost loops of each kernel. The one reader of operands for the machine-code
test (``tests/test_cuda_sources.py``) and the latency model (``bench/sass_latency.py``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Address, guard predicate, opcode, operands.
LINE = re.compile(
    r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?(U?P[T\d]+)\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);", re.M
)
SETP = ("ISETP", "FSETP", "DSETP", "HSETP2", "PLOP3")  # two predicate destinations
CARRY = ("IADD3", "LEA")  # predicates right after the destination: carries out
NO_DESTINATION = ("BRA", "NOP", "BAR", "EXIT")  # and stores, whose first operand is an address
PREDICATE = re.compile(r"\s*U?P(\d+|T)\s*")


@dataclass(frozen=True)
class Instruction:
    address: int
    op: str
    reads: frozenset[str]  # address registers and the guard predicate included
    writes: frozenset[str]
    multiplicands: frozenset[str] = frozenset()  # an HMMA's A and B fragments

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def wavefronts(self) -> int:
        """Shared-memory wavefronts of a load (bank-conflict free), 0 for anything else."""
        if self.base not in ("LDS", "LDSM"):
            return 0
        return len(self.writes)  # a 32-bit word a lane: 128 bytes a register


def operand_registers(operand: str, width: int = 1) -> set[str]:
    """The registers an operand names: ``R10`` of a 4-register operand is R10 .. R13; memory
    operands ``[R2+UR4+0x10]`` name their address registers (``[R4.64]``: R4 and R5);
    predicates P0 .. P6, UP0 .."""
    names = set()
    for prefix, number, wide in re.findall(r"(?<![A-Z0-9])(UR|R|UP|P)(\d+)\b(\.64)?", operand):
        count = width if prefix in ("R", "UR") and not names else 1
        count = max(count, 2 if wide else 1)
        names |= {f"{prefix}{i}" for i in range(int(number), int(number) + count)}
    return names


def destination_width(op: str) -> int:
    base, suffix = op.split(".")[0], op.split(".")[-1]
    if base == "HMMA":
        return 4  # the F32 accumulator fragment of m16n8k8 / m16n8k16
    if base == "LDSM":
        return {"4": 4, "2": 2}.get(suffix, 1)
    if base.startswith(("LD", "ULD")):
        return {"64": 2, "128": 4}.get(suffix, 1)
    if base == "CS2R":
        return 1 if suffix == "32" else 2
    return 2 if ".WIDE" in op else 1


def destinations(op: str, operands: list[str]) -> int:
    """How many of the leading operands ``op`` writes."""
    if op.split(".")[0] in NO_DESTINATION or not operands or "[" in operands[0]:
        return 0
    if op.startswith(SETP):
        return 2
    count = 1
    while op.startswith(CARRY) and count < len(operands) and PREDICATE.fullmatch(operands[count]):
        count += 1
    return count


def instruction(address: int, op: str, operands: list[str], guard: str = "") -> Instruction:
    """One instruction: its operands as written, and the predicate guarding it (read)."""
    count = destinations(op, operands)
    written, read = operands[:count], operands[count:]
    if op.startswith("HMMA"):
        widths = [4, 2, 4]  # A, B, C
    elif ".WIDE" in op:
        widths = [1, 1, 2]
    else:
        widths = []
    sources = [
        operand_registers(o, w) for o, w in zip(read, widths + [1] * len(read), strict=False)
    ]
    writes = set()
    for operand in written:
        writes |= operand_registers(operand, destination_width(op))
    reads = operand_registers(guard).union(*sources)
    multiplicands = sources[0] | sources[1] if op.startswith("HMMA") else set()
    return Instruction(address, op, frozenset(reads), frozenset(writes), frozenset(multiplicands))


def innermost_loops(sass: str) -> dict[str, list[list[Instruction]]]:
    """Per kernel of a ``cuobjdump -sass`` listing, the bodies of its innermost loops (a
    backward branch's, holding no other), in program order."""
    kernels = {}
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        code = [
            (int(a, 16), op, ops.split(","), guard) for a, guard, op, ops in LINE.findall(block)
        ]

        def back_to(address, op, ops, _):
            target = re.search(r"0x([0-9a-f]+)", ops[-1]) if op.startswith("BRA") else None
            return int(target[1], 16) if target and int(target[1], 16) < address else None

        index = {x[0]: i for i, x in enumerate(code)}
        loops = []
        for end, line in enumerate(code):
            head = back_to(*line)
            body = code[index[head] : end + 1] if head in index else []
            if body and not any(back_to(*x) is not None for x in body[:-1]):
                loops.append([instruction(*x) for x in body])
        kernels[block.split("\n", 1)[0].strip()] = loops
    return kernels
