"""Which grouped-matmul kernels a compiled MoE program runs, read off its optimised HLO text
(`compiled.as_text()`), e.g. a train step compiled for a TPU topology without TPUs.

    facts = kernel_facts(compiled.as_text(), expert_weight_shapes(moe_config, d_model, 4, 1))

- Mosaic kernels: custom calls to `tpu_custom_call`, by instruction name: megablox's Pallas
  kernels are `gmm` and `tgmm`; XLA:TPU's own ragged dot is `ragged-dot-*` (with a
  `ragged-dot-metadata` call).
- XLA ragged dots and ragged all-to-alls, by opcode.
- Dense expansion over experts: a dot (or convolution) whose operand or result has the shape
  of a device's expert weights, [E, d, f] or [E, f, d]. The capacity path computes every
  expert's buffer that way; a dropless program on grouped kernels has none (its expert weights
  reach only the kernels and the optimizer's elementwise updates).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MOSAIC_TARGET = 'custom_call_target="tpu_custom_call"'
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b[a-z]\w*\[([\d,]*)\]")


@dataclasses.dataclass
class KernelFacts:
    """Counts of instructions in one HLO module (each instruction once, loops not unrolled)."""

    mosaic_kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> calls
    ragged_dots: int = 0
    ragged_all_to_alls: int = 0
    all_to_alls: int = 0
    # dot/convolution instructions on expert-weight-shaped arrays (their HLO lines, shortened)
    dense_expert_dots: list[str] = dataclasses.field(default_factory=list)


def megablox_calls(facts: KernelFacts) -> int:
    """Calls of megablox's kernels (`gmm`, `tgmm`) among the Mosaic kernels."""
    return sum(count for name, count in facts.mosaic_kernels.items() if name in ("gmm", "tgmm"))


def expert_weight_shapes(moe_config: Any, d_model: int, expert_shards: int = 1,
                         model_shards: int = 1) -> set[tuple[int, ...]]:
    """The shapes one device holds of the expert weights: [E / expert_shards, d, f /
    model_shards] and its transpose order [E / ..., f / ..., d]."""
    experts = moe_config.num_experts // expert_shards
    hidden = moe_config.d_ff // model_shards
    return {(experts, d_model, hidden), (experts, hidden, d_model)}


def kernel_facts(hlo_text: str, weight_shapes: set[tuple[int, ...]]) -> KernelFacts:
    """The `KernelFacts` of an optimised HLO module's text."""
    facts = KernelFacts()
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.group(1), match.group(3)
        if opcode == "custom-call" and MOSAIC_TARGET in line:
            kernel = re.sub(r"\.\d+$", "", name)  # gmm.7 -> gmm
            facts.mosaic_kernels[kernel] = facts.mosaic_kernels.get(kernel, 0) + 1
        elif opcode == "ragged-dot":
            facts.ragged_dots += 1
        elif opcode in ("ragged-all-to-all", "ragged-all-to-all-start"):
            facts.ragged_all_to_alls += 1
        elif opcode in ("all-to-all", "all-to-all-start"):
            facts.all_to_alls += 1
        elif opcode in ("dot", "convolution"):
            shapes = {tuple(int(d) for d in dims.split(",") if d)
                      for dims in _ARRAY.findall(line.split(", metadata=")[0])}
            if shapes & weight_shapes:
                facts.dense_expert_dots.append(line.strip()[:200])
    return facts
