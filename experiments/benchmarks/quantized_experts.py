"""Weight-only int8 / int4 expert weights (`moe_jax.models.quantize`, qwix) on trained runs: the
memory of the expert weights measured from the arrays, and the validation loss before and after.

    python -m experiments.benchmarks.quantized_experts runs/main_job/switch runs/mixtral_e8 ...

restores each run's newest checkpoint, evaluates it on its validation batches as the training
loop does (`evaluate.make_eval_step`: the training config's dispatch and eval capacity) with
float32 experts, then with the experts quantized and dequantized (the change with its
standard error over the validation batches, paired), and writes
results/quantized-experts-<platform>-<date>.md (`--out=PATH.md` to name it; an existing file is
never overwritten). The float32 row reproduces the run's summary.json eval_loss (a check that
the evaluation is the loop's).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from absl import flags

from experiments.benchmarks.run import RESULTS
from experiments.benchmarks.timing import command_line, machine_info, measured_line
from moe_jax.models import Transformer, quantize
from moe_jax.train import evaluate
from moe_jax.train import inputs as train_inputs
from moe_jax.train.restore import restore_run
from moe_jax.utils import cli


def expert_bytes(params, model_config) -> int:
    """Bytes of every MoE block's expert weights (QArrays: values and scales)."""
    from moe_jax.models import transformer

    return sum(quantize.array_bytes({n: layer["experts"][n] for n in layer["experts"]})
               for layer in transformer.moe_layer_variables(params, model_config))


def evaluate_run(workdir: str) -> list[dict]:
    """Rows (precision, expert MB, model MB, val loss) of one run."""
    run = restore_run(workdir)
    e = run.experiment
    model = Transformer(e.model, e.moe)
    domains = train_inputs.domain_names(e.data)
    step = jax.jit(evaluate.make_eval_step(model, e.model, e.moe, num_domains=len(domains),
                                           seed=e.seed, objective_name=e.train.objective))
    data_seq_len = e.train.seq_len or e.model.max_seq_len
    data = train_inputs.make_inputs(e.data, e.model, batch_size=e.train.batch_size,
                                    seq_len=data_seq_len, seed=e.seed)
    batches = list(data.eval_batches())
    rows, float32_nll = [], None
    for precision in ("float32", "int8", "int4"):
        stored = run.params if precision == "float32" else quantize.quantize_experts(
            run.params, e.model, precision)
        params = quantize.dequantize_experts(stored, e.model) if precision != "float32" \
            else stored
        sums = evaluate.EvalSums()
        nll, tokens = [], []  # per batch, for the standard error of the change
        for i, batch in enumerate(batches):
            out = jax.device_get(step(params, run.model_state, batch, np.int32(i)))
            sums.add(out)
            nll.append(float(out["nll_sum"]))
            tokens.append(float(out["num_tokens"]))
        metrics = evaluate.summarize(sums.totals, e.model, domains)
        float32_nll = nll if float32_nll is None else float32_nll
        rows.append({"run": workdir, "precision": precision, "step": run.step,
                     "tokens_trained": run.step * e.train.batch_size * data_seq_len,
                     "val_tokens": int(sum(tokens)),
                     "expert_bytes": expert_bytes(stored, e.model),
                     "model_bytes": quantize.array_bytes(stored),
                     "val_loss": metrics["loss"],
                     "change_se": change_standard_error(np.subtract(nll, float32_nll), tokens)})
    return rows


def change_standard_error(nll_change: np.ndarray, tokens: list[float]) -> float:
    """Standard error of the change in loss per token, sum(nll_change) / sum(tokens), over
    batches (the ratio estimator's: sqrt(n / (n - 1) * sum((d_i - r t_i)^2)) / sum(t_i)); the
    same batches are evaluated at every precision, so the change is paired. [batches]"""
    t = np.asarray(tokens)
    if len(t) < 2:
        return float("nan")
    ratio = nll_change.sum() / t.sum()
    residual = nll_change - ratio * t
    return float(np.sqrt(len(t) / (len(t) - 1) * np.sum(residual ** 2)) / t.sum())


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "PATH.md: the results file (default: "
                        "results/quantized-experts-<platform>-<date>.md)", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    args, runs = cli.parse_flags(define_flags, argv, __doc__, positional="WORKDIR ...")
    if not runs:
        cli.usage_error("give the trained run directories (WORKDIR ...)")
    m = machine_info()
    out = pathlib.Path(args.out) if args.out else (
        RESULTS / f"quantized-experts-{m['platform']}-{m['date'][:10]}.md")
    if out.exists():  # checked before the evaluations, which take minutes
        cli.usage_error(f"{out} exists and would be overwritten; pass --out=ANOTHER.md or move it")
    rows = [row for workdir in runs for row in evaluate_run(workdir)]
    cells = []
    for row in rows:
        base = next(r for r in rows if r["run"] == row["run"] and r["precision"] == "float32")
        change = "" if row is base else (
            f"{row['val_loss'] - base['val_loss']:+.5f} ± {row['change_se']:.5f}")
        cells.append((row["run"], row["step"], f"{row['tokens_trained'] / 1e6:.2f}M",
                      row["val_tokens"], row["precision"], f"{row['expert_bytes'] / 1e6:.2f}",
                      f"{row['model_bytes'] / 1e6:.2f}", f"{row['val_loss']:.5f}", change))
    lines = cli.markdown_table(("run", "step", "tokens trained", "val tokens", "experts",
                                "expert MB", "model MB", "val loss", "change ± SE"),
                               cells).splitlines()
    m = machine_info()  # again, after the evaluations: its load average is the one at the end
    command = command_line("experiments.benchmarks.quantized_experts", argv)
    out.write_text("\n".join([measured_line(m, command), "", *lines]) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
