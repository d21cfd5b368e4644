"""Single-op timings behind the findings in README.md ("What was found"): reductions with and
without a size-1 axis, the expert matmuls at E = 1, 8, 64 for equal FLOPs, and one blocked
grouped matmul (forward, input gradient, weight gradient) against the dense matmul.

    python -m experiments.benchmarks.probes   # ~3 min on 2 CPU cores; writes results/probes-*.md

Each figure is the median of 5 runs after a warm-up, ops interleaved round by round.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.run import RESULTS
from experiments.benchmarks.timing import machine_info, measured_line
from moe_jax.kernels import grouped_matmul as gm
from moe_jax.utils import cli


def _time_all(cases: dict, rounds: int = 5) -> dict[str, float]:
    """Median ms of each jitted case, interleaved round by round after one warm-up."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (fn, args) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def reductions() -> dict[str, float]:
    """sum(a * b, axis=-1) over 8192 x 512 float32 elements laid out with and without size-1
    axes (the gate gradient of a single routing group)."""
    cases = {}
    for shape in [(8192, 512), (8, 1024, 512), (1, 8192, 512), (8, 1, 1024, 512),
                  (8, 1024, 1, 512)]:
        a = jax.random.normal(jax.random.key(0), shape)
        b = jax.random.normal(jax.random.key(1), shape)
        cases[f"sum(a * b, -1), {list(shape)}"] = (jax.jit(lambda a, b: jnp.sum(a * b, -1)),
                                                   (a, b))
    return _time_all(cases)


def expert_matmuls(tokens: int = 8192, d: int = 512, f: int = 2048) -> dict[str, float]:
    """The six matmuls of an expert FFN fwd+bwd, batched over E experts of tokens / E rows."""
    ops = {"x @ wi": ("ecd,edf->ecf", "C", "W"), "h @ wo": ("ecf,efd->ecd", "H", "Wt"),
           "dy @ wo^T": ("ecd,efd->ecf", "C", "Wt"), "h^T dy": ("ecf,ecd->efd", "H", "C"),
           "x^T dh": ("ecd,ecf->edf", "C", "H"), "dh @ wi^T": ("ecf,edf->ecd", "H", "W")}
    cases = {}
    for e in (1, 8, 64):
        rows = tokens // e
        shapes = {"C": (e, rows, d), "H": (e, rows, f), "W": (e, d, f), "Wt": (e, f, d)}
        for name, (eq, a, b) in ops.items():
            x = jax.random.normal(jax.random.key(0), shapes[a])
            y = jax.random.normal(jax.random.key(1), shapes[b])
            if e == 1:  # plain 2-D matmuls
                eq, x, y = eq.replace("e", ""), x[0], y[0]
            cases[f"E={e:<2} {name}"] = (jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y)),
                                        (x, y))
    return _time_all(cases)


def grouped_ops(rows: int = 16384, k: int = 512, n: int = 2048, experts: int = 8
                ) -> dict[str, float]:
    """One blocked grouped matmul (multinomial group sizes) vs the dense matmul, and the zero
    fill of its [rows, n] output carry."""
    x = jax.random.normal(jax.random.key(0), (rows, k))
    w = jax.random.normal(jax.random.key(1), (experts, k, n))
    dy = jax.random.normal(jax.random.key(2), (rows, n))
    sizes = np.random.default_rng(0).multinomial(rows, np.ones(experts) / experts)
    sizes = jnp.asarray(sizes, jnp.int32)
    bs = gm.BLOCK_SIZES
    cases = {
        "dense x @ w": (jax.jit(lambda x, w: x @ w), (x, w[0])),
        "grouped forward": (jax.jit(lambda x, w, g: gm._grouped(x, w, g, False, bs)),
                            (x, w, sizes)),
        "dense dy @ w^T": (jax.jit(lambda dy, w: dy @ w.T), (dy, w[0])),
        "grouped input gradient": (jax.jit(lambda dy, w, g: gm._grouped(dy, w, g, True, bs)),
                                   (dy, w, sizes)),
        "dense x^T dy": (jax.jit(lambda x, dy: x.T @ dy), (x, dy)),
        "grouped weight gradient": (jax.jit(lambda x, dy, g: gm._weight_grad(x, dy, g,
                                                                               experts, bs)),
                                    (x, dy, sizes)),
        f"zero fill [{rows}, {n}]": (jax.jit(lambda x: jnp.zeros((rows, n)) + x[0, 0]), (x,)),
    }
    return _time_all(cases)


def main() -> None:
    lines = []
    for title, probe in (("reductions", reductions), ("expert matmuls", expert_matmuls),
                         ("grouped matmul", grouped_ops)):
        table = cli.markdown_table((title, "ms"), [(name, f"{ms:.2f}")
                                                   for name, ms in probe().items()])
        print(table, flush=True)
        lines += [table, ""]
    m = machine_info()  # after the probes: its load average is the one at the end
    out = RESULTS / f"probes-{m['platform']}-{m['date'][:10]}.md"
    out.write_text("\n".join([measured_line(m, "python -m experiments.benchmarks.probes"), "",
                              *lines]))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
