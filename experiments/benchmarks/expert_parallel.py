"""Step time of the two expert-parallel forms of the MoE layer (fwd+bwd) on a mesh.

On CPU this needs simulated devices, so `run.py` starts it as its own process:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m \
        experiments.benchmarks.expert_parallel --out=ep.json
On CPU the figures check the plumbing, not speed (8 "devices" share the same cores).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from jax.sharding import NamedSharding

from experiments.benchmarks.timing import machine_info, measure
from moe_jax import MoeConfig, moe
from moe_jax.parallel import expert_parallel, sharding
from moe_jax.utils import cli


def time_forms(mesh_shape: tuple[int, int, int], *, tokens_per_device: int = 1024,
               d_model: int = 256, d_ff: int = 1024, num_experts: int = 8, top_k: int = 2,
               repeats: int = 5) -> list[dict[str, Any]]:
    devices = jax.devices()[: mesh_shape[0] * mesh_shape[1] * mesh_shape[2]]
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), devices)
    batch_shards = mesh_shape[0] * mesh_shape[1]
    config = MoeConfig(num_experts=num_experts, top_k=top_k, d_ff=d_ff,
                       group_size=tokens_per_device, activation="gelu")
    x = jax.random.normal(jax.random.key(1), (batch_shards * tokens_per_device, d_model))
    rows = []
    for form in ("gspmd", "explicit"):
        moe_sharding = expert_parallel.MoeSharding(mesh, form=form)
        params = moe.init_params(jax.random.key(0), config, d_model)
        specs = expert_parallel.expert_param_specs(params, moe_sharding)
        params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                              params, specs)
        xs = jax.device_put(x, NamedSharding(mesh, moe_sharding.token_spec))

        def loss(p, x, moe_sharding=moe_sharding):
            y, aux = moe.apply(p, x, config, sharding=moe_sharding)
            return jnp.sum(y**2) + aux["load_balancing_loss"]

        timing = measure(jax.grad(loss, argnums=(0, 1)), params, xs, repeats=repeats)
        rows.append({"benchmark": "expert_parallel", "mesh": list(mesh_shape), "form": form,
                     "tokens": int(x.shape[0]), "timing": timing.as_dict()})
        print(f"  expert-parallel mesh {mesh_shape} {form:8} "
              f"{timing.median_s * 1e3:.1f} ms", flush=True)
    return rows


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "JSON file of the timings", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    out = cli.parse_flags(define_flags, argv, __doc__)[0].out
    meshes = [(1, 8, 1), (2, 4, 1), (2, 2, 2)] if len(jax.devices()) >= 8 else [(1, 1, 1)]
    rows = [row for shape in meshes for row in time_forms(shape)]
    result = {"machine": machine_info(), "num_devices": len(jax.devices()), "rows": rows}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
