"""Mixtral-style (Jiang et al. 2024) sparse models, FLOP-matched to the SwiGLU dense baselines.

Members `e{E}` (tiny scale) and `{scale}_e{E}`: every block sparse, top-2 of E SwiGLU experts
with the two gates renormalised (softmax over the top-2 logits, Mixtral eq. 1), dropless
dispatch (no capacity, nothing dropped), load-balancing loss 1e-2 and z-loss 1e-3. Attention is
the baseline's grouped-query attention. Experts are half the dense SwiGLU width (minus the
router's share), FLOP-matched to `dense.py:{scale}_swiglu`. (The real Mixtral uses experts of the
full dense width, i.e. 2x the dense FLOPs; see configs/published/mixtral_8x7b.py.)
"""

from moe_jax import schema
from moe_jax.analysis import flops

EXPERTS = (8, 16, 32)
MEMBERS = tuple(f"e{e}" for e in EXPERTS) + tuple(f"small_e{e}" for e in EXPERTS)


def get_config(arg: str = "e8"):
    if arg not in MEMBERS:
        raise ValueError(f"configs/mixtral.py member {arg!r} is unknown; use one of {MEMBERS}.")
    scale, _, experts = arg.rpartition("_")
    dense = f"dense.py:{scale or 'tiny'}_swiglu"
    return flops.match_flops(
        schema.load_config(dense), num_experts=int(experts[1:]), top_k=2, moe_every=1,
        matched_to=dense, router="top_k", renormalize_gates=True, dispatch="dropless",
        load_balance_coef=1e-2, z_loss_coef=1e-3).config
