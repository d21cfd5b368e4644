"""Capacity-factor ablations on `switch.py:e16` (tiny): what dropping tokens costs.

Members: `cf0.5`, `cf1.0`, `cf1.25`, `cf1.5`, `cf2.0` (training capacity factor; evaluation
stays at 2.0), `dropless` (no capacity, nothing dropped) and `cf1.0_bpr` (capacity 1.0 with
V-MoE batch-priority routing instead of token order). The experts are those of switch.py:e16,
so every member has the same useful FLOPs (FLOP-matched to `dense.py:tiny`); only the padded
capacity (and, below 1.0, guaranteed drops) differs; `python -m moe_jax.analysis.flops` shows it.
"""

from moe_jax import schema

FACTORS = (0.5, 1.0, 1.25, 1.5, 2.0)
MEMBERS = (*(f"cf{f}" for f in FACTORS), "dropless", "cf1.0_bpr")


def get_config(arg: str = "cf1.0"):
    if arg not in MEMBERS:
        raise ValueError(f"configs/capacity.py member {arg!r} is unknown; use one of {MEMBERS}.")
    config = schema.load_config("switch.py:e16")
    factor, _, priority = arg.partition("_")
    if factor == "dropless":
        config.moe.dispatch = "dropless"
    else:
        config.moe.capacity_factor = float(factor[2:])
    if priority == "bpr":
        config.moe.drop_priority = "batch_priority"
    return schema.checked(config)
