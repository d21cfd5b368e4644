"""What a compiled XLA program says about one call: its collectives, memory and cost.

    collectives = collective_counts(compiled.as_text())   # {kind: Collective}
    memory = memory_bytes(compiled)                        # per device, from memory_analysis()
    flops, bytes_accessed = xla_cost(compiled)             # per device, from cost_analysis()

Collectives are read from the optimised HLO text: every instruction whose opcode is one of
`COLLECTIVES` (or its asynchronous `-start` form), with the bytes of its result shape (the
gathered array of an all-gather, the shard of a reduce-scatter, the exchanged array of an
all-to-all or all-reduce) and the number of devices in each of its groups
(`replica_groups`; an empty list means all of the program's partitions). An instruction inside
a while loop (a scan over layers or micro-batches) runs once per iteration: `per_step`
multiplies by the trip counts that the loop conditions state (`i < N`; loops whose count cannot
be read count once, and `unknown_trip_counts` says how many there were). XLA's cost analysis,
in contrast, counts a loop body once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
_ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
               "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
# replica_groups={{0,1},{2,3}} (explicit), replica_groups=[2,2]<=[4] (iota: groups x size),
# replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'} (the mesh axes each group spans).
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_PARTITIONS = re.compile(r"num_partitions=(\d+)")


@dataclasses.dataclass
class Collective:
    """One kind of collective: instructions in the program, executions per call (loop trip
    counts applied) and the bytes of their results, per device."""

    instructions: int = 0
    per_step: int = 0
    result_bytes: int = 0
    result_bytes_per_step: int = 0
    # result_bytes_per_step split by the size of the instruction's device groups (1 for a
    # collective-permute, whose pairs are not groups): {group size: bytes per step}.
    bytes_per_step_by_group: dict[int, int] = dataclasses.field(default_factory=dict)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (an array, or a tuple of arrays)."""
    return int(sum(_ITEM_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
                   for dtype, dims in _ARRAY.findall(shape)))


def group_size(instruction: str, partitions: int) -> int:
    """Devices per group of a collective instruction's `replica_groups` (`partitions`, all of
    the program's devices, when the groups are empty or absent)."""
    if match := _EXPLICIT_GROUPS.search(instruction):
        return len([d for d in match.group(1).split(",") if d]) or partitions
    if match := _IOTA_GROUPS.search(instruction):
        return int(match.group(2))
    if match := _MESH_GROUPS.search(instruction):
        sizes = {axis: int(n) for axis, n in re.findall(r"'([\w.]+)'=(\d+)", match.group(1))}
        return math.prod(sizes[axis] for axis in re.findall(r"'([\w.]+)'", match.group(2)))
    return partitions


def _result_bytes(opcode: str, shape: str) -> int:
    """Bytes of a collective's result. The asynchronous `-start` forms of all-gather and
    collective-permute return a tuple (operand, result, ...): their result is the second
    array."""
    arrays = _ARRAY.findall(shape)
    if opcode.endswith("-start") and shape.startswith("(") and len(arrays) >= 2:
        return shape_bytes(f"{arrays[1][0]}[{arrays[1][1]}]")
    return shape_bytes(shape)


def _computations(text: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines}; the entry is "ENTRY"."""
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if match := _COMPUTATION.match(line):
            current = computations.setdefault(
                "ENTRY" if line.startswith("ENTRY") else match.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return computations


def _trip_count(condition: list[str]) -> int | None:
    """N of a loop condition `counter < N` with a constant N (how jax lowers scans)."""
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)",
                                "\n".join(condition)))
    for line in condition:
        if "ROOT" in line and "direction=LT" in line:
            operands = re.findall(r"%([\w.\-]+)", line.split("compare(", 1)[-1])
            found = [int(constants[o]) for o in operands if o in constants]
            if found:
                return found[0]
    return None


def _multipliers(computations: dict[str, list[str]]) -> tuple[dict[str, int], int]:
    """How often each computation runs per call of the entry (while bodies: trip count times
    their caller's), and how many loops had no readable trip count."""
    runs = {"ENTRY": 1}
    unknown = 0
    pending = ["ENTRY"]
    while pending:
        name = pending.pop()
        for line in computations.get(name, []):
            called = re.findall(r"(?:calls|to_apply|body|condition|true_computation|"
                                r"false_computation)=%([\w.\-]+)", line)
            called += [c for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
                       for c in re.findall(r"%([\w.\-]+)", group)]
            times = 1
            if " while(" in line:
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                condition = re.search(r"condition=%([\w.\-]+)", line)
                count = int(known.group(1)) if known else (
                    _trip_count(computations.get(condition.group(1), [])) if condition else None)
                unknown += count is None
                times = count or 1
            for callee in called:
                if callee not in runs:
                    runs[callee] = runs[name] * times
                    pending.append(callee)
    return runs, unknown


def collective_counts(hlo_text: str) -> tuple[dict[str, Collective], int]:
    """({kind: Collective} for the kinds present, number of loops with unknown trip counts)."""
    computations = _computations(hlo_text)
    runs, unknown = _multipliers(computations)
    partitions = int(match.group(1)) if (match := _PARTITIONS.search(hlo_text)) else 1
    found: dict[str, Collective] = {}
    for name, lines in computations.items():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            opcode = match.group(3).removesuffix("-start")
            if opcode not in COLLECTIVES or match.group(3).endswith("-done"):
                continue
            size = _result_bytes(match.group(3), match.group(2))
            entry = found.setdefault(opcode, Collective())
            entry.instructions += 1
            entry.per_step += runs.get(name, 1)
            entry.result_bytes += size
            entry.result_bytes_per_step += size * runs.get(name, 1)
            group = 1 if opcode == "collective-permute" else group_size(line, partitions)
            entry.bytes_per_step_by_group[group] = (entry.bytes_per_step_by_group.get(group, 0)
                                                    + size * runs.get(name, 1))
    return dict(sorted(found.items())), unknown


def loop_trip_counts(hlo_text: str) -> list[int | None]:
    """The trip count of every while loop in the program (None where it cannot be read)."""
    computations = _computations(hlo_text)
    counts = []
    for line in (line for lines in computations.values() for line in lines):
        if " while(" in line and (condition := re.search(r"condition=%([\w.\-]+)", line)):
            counts.append(_trip_count(computations.get(condition.group(1), [])))
    return counts


def memory_bytes(compiled: Any) -> dict[str, int]:
    """Per-device bytes from XLA's memory analysis: arguments, outputs, aliased (outputs that
    reuse donated arguments), temporaries, generated code, and `peak` = arguments + outputs -
    aliased + temporaries + code (everything live at once, the upper bound XLA plans for)."""
    stats = compiled.memory_analysis()
    out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                   + out["generated_code"])
    return out


def xla_cost(compiled: Any) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per device from XLA's cost analysis (loop bodies counted once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
