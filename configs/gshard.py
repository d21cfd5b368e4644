"""GShard (Lepikhin et al. 2021) top-2 routing, FLOP-matched to the dense baselines.

Members `e{E}` (tiny scale) and `{scale}_e{E}`: every other block sparse, top-2 with gates
renormalised over the two chosen (GShard Alg. 1), the second expert kept with probability
2 * g2 (Alg. 2, `second_expert_policy="random"`), capacity 2T/E per group (our convention
C = ceil(k * T * capacity_factor / E), so capacity_factor=1.0 with k=2), load-balancing loss 1e-2.
Experts are half the dense FFN's width (minus the router's share) so two of them cost one dense
FFN: FLOP-matched to `dense.py:{scale}`.
"""

from moe_jax import schema
from moe_jax.analysis import flops

EXPERTS = (8, 16, 32, 64)
MEMBERS = tuple(f"e{e}" for e in EXPERTS) + tuple(f"small_e{e}" for e in EXPERTS)


def get_config(arg: str = "e16"):
    if arg not in MEMBERS:
        raise ValueError(f"configs/gshard.py member {arg!r} is unknown; use one of {MEMBERS}.")
    scale, _, experts = arg.rpartition("_")
    dense = f"dense.py:{scale or 'tiny'}"
    return flops.match_flops(
        schema.load_config(dense), num_experts=int(experts[1:]), top_k=2, moe_every=2,
        matched_to=dense, router="top_k", renormalize_gates=True, second_expert_policy="random",
        capacity_factor=1.0, eval_capacity_factor=2.0, drop_priority="rank",
        load_balance_coef=1e-2, z_loss_coef=0.0).config
