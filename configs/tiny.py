"""The CPU-scale sweep: the tiny member of every family, for one table or a quick comparison.

`python -m moe_jax.analysis.flops --family=configs/tiny.py` prints params and FLOPs of all of them;
`--config=configs/tiny.py:switch_e16` is the same config as `configs/switch.py:e16`.
"""

from moe_jax import schema

SPECS = {
    "dense": "dense.py:tiny",
    "dense_swiglu": "dense.py:tiny_swiglu",
    "dense_encoder": "dense.py:tiny_encoder",
    "switch_e8": "switch.py:e8",
    "switch_e16": "switch.py:e16",
    "switch_e64": "switch.py:e64",
    "switch_e128": "switch.py:e128",
    "gshard_e16": "gshard.py:e16",
    "mixtral_e8": "mixtral.py:e8",
    "expert_choice_e16": "expert_choice.py:e16",
    "fine_grained_e64k8s0": "fine_grained.py:e64k8s0",
    "fine_grained_e62k6s2": "fine_grained.py:e62k6s2",
    "capacity_cf2.0": "capacity.py:cf2.0",
    "aux_loss_lb0_bias": "aux_loss.py:lb0_bias",
}
MEMBERS = tuple(SPECS)


def get_config(arg: str = "dense"):
    if arg not in SPECS:
        raise ValueError(f"configs/tiny.py member {arg!r} is unknown; use one of {MEMBERS}.")
    return schema.load_config(SPECS[arg])
