"""Expert-choice routing (Zhou et al. 2022) in a bidirectional encoder with the masked-LM
objective, FLOP-matched to `dense.py:{scale}_encoder`.

Expert choice lets each expert pick its C best tokens of the group, so a token's output depends
on later tokens: honest only without a causal mask (a causal LM refuses it, see
`models.check_compatible`). Members `e{E}` (tiny) and `small_e{E}`: every other block sparse,
capacity factor 2 (EC-CF2: C = 2T/E, on average two experts per token, Zhou et al. Sec. 4),
no auxiliary balancing loss (balanced by construction), z-loss 1e-3. Experts are half the dense
width (minus the router's share). Train with `objective.mask_for_mlm`.
"""

from moe_jax import schema
from moe_jax.analysis import flops

EXPERTS = (8, 16, 32)
MEMBERS = tuple(f"e{e}" for e in EXPERTS) + tuple(f"small_e{e}" for e in EXPERTS)


def get_config(arg: str = "e16"):
    if arg not in MEMBERS:
        raise ValueError(f"configs/expert_choice.py member {arg!r} is unknown; use one of "
                         f"{MEMBERS}.")
    scale, _, experts = arg.rpartition("_")
    dense = f"dense.py:{scale or 'tiny'}_encoder"
    return flops.match_flops(
        schema.load_config(dense), num_experts=int(experts[1:]), top_k=1, moe_every=2,
        matched_to=dense, router="expert_choice", capacity_factor=2.0, eval_capacity_factor=2.0,
        load_balance_coef=0.0, z_loss_coef=1e-3).config
