"""Apply one MoE layer to random tokens and print its routing statistics.

    python -m moe_jax.demo --num_experts=8 --top_k=2 --capacity_factor=1.0 --dispatch=gather

Every `MoeConfig` field can be set as `--field=value`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import typing

import jax
import jax.numpy as jnp

from moe_jax import MoeConfig, moe


def _parse(argv: list[str] | None = None) -> tuple[MoeConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    hints = typing.get_type_hints(MoeConfig)
    for field in dataclasses.fields(MoeConfig):
        default = field.default
        # the type of the default; for an optional field (None) the X of `X | None`
        inner = type(default) if default is not None else next(
            t for t in typing.get_args(hints[field.name]) if t is not type(None))
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes"), int: int, float: float}.get(
            inner, str)
        parser.add_argument(f"--{field.name}", type=kind, default=default)
    args = parser.parse_args(argv)
    config = MoeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MoeConfig)})
    return config, args


def main(argv: list[str] | None = None) -> dict[str, jax.Array]:
    config, args = _parse(argv)
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
