"""moe_jax's Mixtral layer against Hugging Face's `MixtralSparseMoeBlock`, fwd+bwd, one process.

    python -m experiments.benchmarks.hf_moe_block                 # needs torch and transformers
    LD_PRELOAD=libtcmalloc_minimal.so.4 python -m experiments.benchmarks.hf_moe_block

Dev only: torch and transformers are not dependencies of moe_jax (`pip install torch
transformers` beside it). Both layers get the same weights (HF's `gate.weight`, fused
`experts.gate_up_proj` and `experts.down_proj`, copied into moe_jax's `router`, `wi_gate`, `wi`,
`wo`) and the same input; their outputs are compared before timing, so the two compute the same
function: top-2 of 8 experts, softmax over the two chosen logits (Mixtral eq. 1), SwiGLU experts,
dropless. One call is the forward pass and the gradient of <y, cotangent> with respect to the
input and every weight (`layer.vjp_loss`; torch: `backward` with the gradients reset to None, so
each call allocates them as XLA does). Rounds interleave the two, order alternating; the ratio
per round is moe_jax / HF, and its median is reported with wall and process-CPU time. torch
runs on `torch.get_num_threads()` threads (all cores), as XLA:CPU does.

Results: `results/hf-moe-block-<platform>-<date>.{json,md}` (or `--out`), with machine, date,
commit, command, malloc, torch and transformers versions.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from experiments.benchmarks.layer import vjp_loss
from experiments.benchmarks.layer_ratio import _usage
from experiments.benchmarks.timing import command_line, machine_info, measured_line
from moe_jax import MoeConfig, moe
from moe_jax.utils import cli

RESULTS = pathlib.Path(__file__).parent / "results"


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_integer("tokens", 8192, "tokens per call", flag_values=values)
    flags.DEFINE_integer("d_model", 512, "model width", flag_values=values)
    flags.DEFINE_integer("d_ff", 1024, "expert width", flag_values=values)
    flags.DEFINE_integer("experts", 8, "number of experts", flag_values=values)
    flags.DEFINE_integer("top_k", 2, "experts per token", flag_values=values)
    flags.DEFINE_integer("rounds", 9, "interleaved rounds", lower_bound=1, flag_values=values)
    flags.DEFINE_string("out", None, "results JSON path (default: results/hf-moe-block-"
                        "<platform>-<date>.json; the .md beside it)", flag_values=values)


def hf_block(d_model: int, d_ff: int, num_experts: int, top_k: int, seed: int = 0):
    """transformers' Mixtral MoE block with weights drawn at unit-variance fan-in scale."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=d_model, intermediate_size=d_ff,
                           num_local_experts=num_experts, num_experts_per_tok=top_k,
                           router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(config).float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    return block


def moe_jax_params(block, d_ff: int) -> dict[str, Any]:
    """HF's weights in moe_jax's layout: router [d, E]; experts wi_gate, wi [E, d, f]; wo [E, f, d]
    (HF: gate.weight [E, d]; experts.gate_up_proj [E, 2f, d], gate rows first; down_proj
    [E, d, f])."""
    state = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    gate_up = state["experts.gate_up_proj"]
    return {"router": {"kernel": state["gate.weight"].T},
            "experts": {"wi_gate": gate_up[:, :d_ff].transpose(0, 2, 1),
                        "wi": gate_up[:, d_ff:].transpose(0, 2, 1),
                        "wo": state["experts.down_proj"].transpose(0, 2, 1)}}


class Timed:
    """One fwd+bwd callable and its per-round wall, CPU and system seconds."""

    def __init__(self, name: str, call: Callable[[], Any]) -> None:
        self.name, self.call = name, call
        self.wall: list[float] = []
        self.cpu: list[float] = []
        for _ in range(2):  # warm-up
            call()

    def run(self) -> None:
        cpu = _usage()[0]
        start = time.perf_counter()
        self.call()
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(_usage()[0] - cpu)


def members(args) -> tuple[list[Timed], float]:
    """[moe_jax, HF], compiled and warmed up, and the largest output difference between them."""
    import torch

    block = hf_block(args.d_model, args.d_ff, args.experts, args.top_k)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.tokens, args.d_model), dtype=np.float32)
    cotangent = rng.standard_normal(x.shape, dtype=np.float32)
    config = MoeConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff,
                       router="top_k", renormalize_gates=True, dispatch="dropless",
                       activation="swiglu", load_balance_coef=0.0,
                       z_loss_coef=0.0)
    params = jax.tree.map(jax.numpy.asarray, moe_jax_params(block, args.d_ff))

    def apply(p, x):
        return moe.apply(p, x, config, train=True)[0]

    jx, jc = jax.numpy.asarray(x), jax.numpy.asarray(cotangent)
    compiled = jax.jit(vjp_loss(apply)).lower(params, jx, jc).compile()
    tx, tc = torch.from_numpy(x), torch.from_numpy(cotangent)

    def hf_call() -> None:
        for p in block.parameters():
            p.grad = None
        xi = tx.clone().requires_grad_(True)
        y = block(xi[None])[0]
        (y * tc).sum().backward()

    with torch.no_grad():
        difference = float(np.abs(np.asarray(apply(params, jx)) - block(tx[None])[0].numpy()).max())
    if difference > 1e-4:
        raise SystemExit(f"the two layers' outputs differ by {difference:.2e}: the weight mapping "
                         "(moe_jax_params) no longer matches transformers' layout; nothing timed.")
    return [Timed("moe_jax Mixtral layer (dropless)",
                  lambda: jax.block_until_ready(compiled(params, jx, jc))),
            Timed("HF MixtralSparseMoeBlock", hf_call)], difference


def main(argv: Sequence[str] | None = None) -> str:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"{e}: this benchmark needs torch and transformers beside moe_jax "
                         "(pip install torch transformers); nothing was measured.") from e
    load_before = os.getloadavg()[0]
    group, difference = members(args)
    for r in range(args.rounds):
        for member in (group if r % 2 == 0 else group[::-1]):
            member.run()
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m.name} {m.wall[-1] * 1e3:.0f} ms (cpu {m.cpu[-1] * 1e3:.0f})" for m in group),
            flush=True)
    ours, theirs = group
    median = statistics.median
    wall_ratio = median(a / b for a, b in zip(ours.wall, theirs.wall, strict=True))
    cpu_ratio = median(a / b for a, b in zip(ours.cpu, theirs.cpu, strict=True))
    machine = machine_info()
    command = command_line("experiments.benchmarks.hf_moe_block", argv)
    out = args.out or str(RESULTS / f"hf-moe-block-{machine['platform']}-"
                                    f"{time.strftime('%Y-%m-%d')}.json")
    result = {"machine": machine, "command": command, "load_average_1m_before": load_before,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "transformers": transformers.__version__, "max_output_difference": difference,
              "shape": {k: getattr(args, k) for k in ("tokens", "d_model", "d_ff", "experts",
                                                       "top_k")},
              "rows": [{"member": m.name, "wall_ms": median(m.wall) * 1e3,
                        "cpu_ms": median(m.cpu) * 1e3, "rounds_wall_s": m.wall,
                        "rounds_cpu_s": m.cpu} for m in group],
              "wall_ratio": wall_ratio, "cpu_ratio": cpu_ratio}
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps(result, indent=1))
    shape = result["shape"]
    text = "\n".join([
        "# moe_jax's Mixtral layer vs Hugging Face's MixtralSparseMoeBlock, fwd+bwd", "",
        measured_line(machine, command) + f" Load average {load_before:.2f} before; torch "
        f"{torch.__version__} on {torch.get_num_threads()} threads, transformers "
        f"{transformers.__version__}; {args.rounds} rounds; {shape['tokens']} tokens, d "
        f"{shape['d_model']}, {shape['experts']} experts of width {shape['d_ff']}, top-"
        f"{shape['top_k']}, float32; outputs equal to {difference:.1e}.", "",
        cli.markdown_table(("fwd+bwd", "wall ms", "CPU ms"),
                           [(r["member"], f"{r['wall_ms']:.0f}", f"{r['cpu_ms']:.0f}")
                            for r in result["rows"]]),
        "", f"moe_jax / HF: {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x CPU (median of per-round "
        "ratios).", ""])
    pathlib.Path(out.removesuffix(".json") + ".md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
