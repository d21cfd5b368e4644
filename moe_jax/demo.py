"""Apply one MoE layer to random tokens and print its routing statistics.

    python -m moe_jax.demo --num_experts=8 --top_k=2 --capacity_factor=1.0 --dispatch=gather

Every `MoeConfig` field can be set as `--field=value`.
"""

from __future__ import annotations

import dataclasses
import time
import typing

import jax
import jax.numpy as jnp
from absl import flags

from moe_jax import MoeConfig, moe
from moe_jax.utils import cli


def define_flags(values: flags.FlagValues) -> None:
    """--tokens, --d_model, --seed and one flag per `MoeConfig` field (its default)."""
    flags.DEFINE_integer("tokens", 4096, "tokens routed", flag_values=values)
    flags.DEFINE_integer("d_model", 256, "model width", flag_values=values)
    flags.DEFINE_integer("seed", 0, "random key of the parameters and tokens", flag_values=values)
    hints = typing.get_type_hints(MoeConfig)
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}
    for field in dataclasses.fields(MoeConfig):
        default = field.default
        # the type of the default; for an optional field (None) the X of `X | None`
        inner = type(default) if default is not None else next(
            t for t in typing.get_args(hints[field.name]) if t is not type(None))
        define[inner](field.name, default, f"MoeConfig.{field.name}", flag_values=values)


def main(argv: list[str] | None = None) -> dict[str, jax.Array]:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    config = MoeConfig(**{f.name: args[f.name].value for f in dataclasses.fields(MoeConfig)})
    key_params, key_x, key_rng = jax.random.split(jax.random.key(args.seed), 3)
    params = moe.init_params(key_params, config, args.d_model)
    x = jax.random.normal(key_x, (args.tokens, args.d_model))
    apply = jax.jit(lambda p, x, r: moe.apply(p, x, config, train=True, rng=r))
    start = time.perf_counter()
    y, aux = jax.block_until_ready(apply(params, x, key_rng))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(apply(params, x, key_rng))
    run = time.perf_counter() - start

    e, k = config.num_experts, config.top_k
    print(f"MoE layer: E={e} top_k={k} router={config.router} dispatch={config.dispatch} "
          f"capacity={config.capacity(config.group_size or args.tokens, train=True)} "
          f"(factor {config.capacity_factor}) on {args.tokens} tokens x d_model {args.d_model}, "
          f"{jax.devices()[0].platform}")
    print(f"  output {tuple(y.shape)} {y.dtype}; first call {compile_and_run:.2f}s "
          f"(compile + run), second {run * 1e3:.1f} ms")
    for name in ("load_balancing_loss", "router_z_loss", "router_entropy", "dropped_fraction",
                 "max_router_logit"):
        print(f"  {name:<22}{float(aux[name]):.4f}")
    print(f"  router entropy of uniform routing ln E = {float(jnp.log(e)):.4f}")
    print("  expert load (kept share of the T*k assignments; balanced = 1/E = "
          f"{1 / e:.3f}):")
    load = aux["expert_load"]
    for i, share in enumerate(load.tolist()):
        print(f"    expert {i:>3} {share:6.3f} {'#' * round(share * e * 20)}")
    return aux


if __name__ == "__main__":
    main()
