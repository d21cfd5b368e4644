"""Switch Transformer (Fedus et al. 2022) top-1 routing, FLOP-matched to the dense baselines.

Members `e{E}` (tiny scale) and `{scale}_e{E}` (scale mini, small or base) for E in
{4, 8, 16, 32, 64, 128}: every other block sparse (blocks 1, 3, ...), top-1 with raw softmax
gates, capacity factor 1.25 in training and 2.0 in evaluation, rank (token-order) drop priority,
load-balancing loss 1e-2, no z-loss (Switch predates it; see aux_loss.py). Experts have the
dense FFN's width minus the router's FLOPs (`flops.match_flops`), so every member costs the same
FLOPs per token as `dense.py:{scale}` while holding ~E/2 times its FFN parameters.
"""

from moe_jax import schema
from moe_jax.analysis import flops

EXPERTS = (4, 8, 16, 32, 64, 128)
SCALES = ("tiny", "mini", "small", "base")
MEMBERS = tuple(f"e{e}" for e in EXPERTS) + tuple(
    f"{s}_e{e}" for s in SCALES[1:] for e in EXPERTS)


def get_config(arg: str = "e16"):
    if arg not in MEMBERS and f"tiny_{arg}" not in MEMBERS:
        raise ValueError(f"configs/switch.py member {arg!r} is unknown; use one of {MEMBERS}.")
    scale, _, experts = arg.rpartition("_")
    dense = f"dense.py:{scale or 'tiny'}"
    return flops.match_flops(
        schema.load_config(dense), num_experts=int(experts[1:]), top_k=1, moe_every=2,
        matched_to=dense, router="top_k", renormalize_gates=False, capacity_factor=1.25,
        eval_capacity_factor=2.0, drop_priority="rank", load_balance_coef=1e-2,
        z_loss_coef=0.0).config
