"""Auxiliary-loss ablations on `switch.py:e16` (tiny), FLOP-matched to `dense.py:tiny`.

Members `lb{c}` set the load-balancing coefficient (Switch eq. 4; 0 turns it off) and `z{c}` the
router z-loss coefficient (ST-MoE eq. 5), the other staying at switch.py's value (lb 1e-2,
z 0); `lb0_bias` replaces the balancing loss with DeepSeek-V3's auxiliary-loss-free bias
balancing (sigmoid router with a per-expert bias, step 1e-3).
"""

from moe_jax import schema

LOAD_BALANCE = ("0", "1e-3", "1e-2", "1e-1")
Z_LOSS = ("0", "1e-4", "1e-3", "1e-2")
MEMBERS = (tuple(f"lb{c}" for c in LOAD_BALANCE) + tuple(f"z{c}" for c in Z_LOSS)
           + ("lb0_bias",))


def get_config(arg: str = "lb1e-2"):
    if arg not in MEMBERS:
        raise ValueError(f"configs/aux_loss.py member {arg!r} is unknown; use one of {MEMBERS}.")
    config = schema.load_config("switch.py:e16")
    if arg == "lb0_bias":
        config.moe.router = "sigmoid_bias"
        config.moe.load_balance_coef = 0.0
        config.moe.bias_update_rate = 1e-3
    elif arg.startswith("lb"):
        config.moe.load_balance_coef = float(arg[2:])
    else:
        config.moe.z_loss_coef = float(arg[1:])
    return schema.checked(config)
