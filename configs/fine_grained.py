"""Fine-grained and shared experts (DeepSeekMoE, Dai et al. 2024), FLOP-matched to
`dense.py:tiny_swiglu`.

Member `e{E}k{k}s{S}`: E routed experts of which each token uses k, plus S shared experts that
every token uses. All blocks but the first are sparse (DeepSeekMoE keeps block 0 dense). Expert
width ~ dense width / (k + S) (minus the router's share), so each member has the dense FLOPs:
`e8k1s0` is a coarse Switch-like baseline, `e16k2s0` ... `e64k8s0` split each expert 2..8 ways
(fine-grained segmentation, Sec. 3.1), and `e63k7s1`, `e62k6s2` isolate 1 or 2 of those 64
segments as shared experts (Sec. 3.2, keeping 64 experts in total). Top-k with raw softmax
gates, dropless dispatch, load-balancing loss 1e-2 and z-loss 1e-3.
"""

import re

from moe_jax import schema
from moe_jax.analysis import flops

MEMBERS = ("e8k1s0", "e16k2s0", "e32k4s0", "e64k8s0", "e63k7s1", "e62k6s2")


def get_config(arg: str = "e64k8s0"):
    match = re.fullmatch(r"e(\d+)k(\d+)s(\d+)", arg)
    if match is None:
        raise ValueError(f"configs/fine_grained.py member {arg!r} is not of the form "
                         f"e<E>k<k>s<S>; e.g. one of {MEMBERS}.")
    experts, top_k, shared = (int(g) for g in match.groups())
    dense = "dense.py:tiny_swiglu"
    base = schema.load_config(dense)
    return flops.match_flops(
        base, num_experts=experts, top_k=top_k, num_shared_experts=shared,
        moe_layers=tuple(range(1, base.model.num_layers)), matched_to=dense, router="top_k",
        renormalize_gates=False, dispatch="dropless", load_balance_coef=1e-2,
        z_loss_coef=1e-3).config
