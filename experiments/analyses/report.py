"""The report of a suite: results file -> Markdown tables, PNG figures and a verdict per paper
claim (`build`), and the claims of every results file in experiments/REPRODUCTION.md
(`write_reproduction`); `python -m experiments.report` is its command line.

`build` reads a results file (experiments/results/<suite>/<scale>.json, written by
experiments.run) and writes the figures next to it. Tables give the mean ± SD
over the finished seeds (n); each claim's verdict follows the rule of experiments/library/stats.py
(agrees / disagrees beyond 2 standard errors, else inconclusive) computed from the runs, never
written by hand. The FLOP/parameter tables of the scale that ran and of the `paper` scale come
from moe_jax.analysis.flops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from experiments import suites
from experiments.library import stats
from experiments.library.base import SCALES, Suite
from experiments.library.results import DIVERGED, FAILED, FINISHED, METRICS, MISSING, Results
from moe_jax.utils.cli import markdown_table

BASE_COLUMNS = ("eval_loss",)


def _cell(values: Sequence[float], digits: int) -> str:
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def _big(values: Sequence[float]) -> str:
    if not values:
        return "-"
    v = float(np.mean(values))
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def results_table(results: Results, columns: Sequence[str]) -> str:
    """One row per member: tags, finished/diverged counts and mean ± SD of each metric."""
    header = ["member", "tags", "n (fin/div/fail/miss)",
              *(METRICS[c].label for c in columns)]
    rows = []
    for member in results.members():
        tags = ", ".join(f"{k}={v}" for k, v in results.tags(member).items())
        counts = "/".join(str(results.count(member, s))
                          for s in (FINISHED, DIVERGED, FAILED, MISSING))
        cells = []
        for c in columns:
            values = results.values(member, c)
            metric = METRICS[c]
            cells.append(_big(values) if metric.digits == 0 else _cell(values, metric.digits))
        rows.append([member, tags, counts, *cells])
    return markdown_table(header, rows)


def claims_table(suite: Suite, results: Results) -> tuple[str, dict[str, stats.Outcome]]:
    outcomes = {claim.id: claim.check(results) for claim in suite.claims}
    rows = [[f"**{c.id}**: {c.statement}", c.source, c.paper_value, outcomes[c.id].measured,
             f"**{outcomes[c.id].verdict}**", outcomes[c.id].rule] for c in suite.claims]
    table = markdown_table(["claim", "source", "paper reports", "we measured", "verdict",
                            "rule"], rows)
    return table, outcomes


def flops_table(suite: Suite, scale: str) -> str:
    """moe_jax.analysis.flops table of the suite's members at `scale` (routing group: one batch)."""
    from moe_jax import schema
    from moe_jax.analysis import flops

    settings = SCALES[scale]
    rows = []
    for member in suite.member_list(scale):
        overrides = {k: v for k, v in member.overrides.items() if not k.startswith("init.")}
        config = schema.override(schema.load_config(member.config), overrides)  # FLOPs only
        tokens = settings.get("train.batch_size", 1) * config.model.max_seq_len
        rows.append(flops.table_row(member.name, config, tokens_per_group=tokens))
    return flops.format_table(rows)


def _settings_line(results: Results) -> str:
    run = next((r for r in results.runs), None)
    if run is None:
        return ""
    o = run["overrides"]
    keys = ("train.num_train_steps", "train.batch_size", "train.learning_rate",
            "train.warmup_steps", "data.name")
    return ", ".join(f"{k.split('.')[-1]}={o[k]}" for k in keys if k in o)


def _runtime_line(results: Results) -> str:
    seconds = [r["runner_seconds"] for r in results.runs if r.get("runner_seconds")]
    if not seconds:
        return "no run times recorded"
    line = (f"{len(seconds)} runs took {sum(seconds) / 60:.1f} min in total "
            f"({np.mean(seconds):.0f} s per run on average, including start-up and compilation)")
    if results.throughput:  # the time basis of the speed-ups
        bench = results.throughput
        line += (f". Speed-ups in training time use each member's tokens/s measured in one "
                 f"process, members interleaved ({bench['rounds']} rounds x {bench['steps']} "
                 f"steps; {bench['machine']['date']}, {bench['machine']['cpu']}, commit "
                 f"{bench['machine']['commit']}, load average "
                 f"{bench['load_average_1m_before']:.2f} before; `{bench['command']}`), not the "
                 "rates the runs logged")
    return line


def _missing_lines(results: Results) -> list[str]:
    """A line naming the runs not done yet (a partial suite), or none."""
    missing = {}
    for run in results.runs:
        if run["status"] == MISSING:
            missing.setdefault(run["member"], []).append(str(run["seed"]))
    if not missing:
        return []
    listed = "; ".join(f"{m} (seed {', '.join(s)})" for m, s in missing.items())
    return ["", f"**Partial suite**: not run yet: {listed}. Tables and verdicts use the "
            "finished runs only."]


def build(suite: Suite, results: Results, out_dir: str, figures: bool = True) -> str:
    """Writes the figures and returns the Markdown report."""
    scale = results.scale
    machine = results.data.get("machine", {})
    counts = {s: sum(r["status"] == s for r in results.runs)
              for s in (FINISHED, DIVERGED, FAILED, MISSING)}
    parts = [f"# {suite.title} ({scale})", "",
             f"Suite `{suite.name}`, results `{scale}.json` created {results.data.get('created')}"
             f" at commit `{machine.get('commit', '?')}` on {machine.get('cpu_count', '?')} "
             f"CPU cores{', GPU ' + machine['gpu'] if machine.get('gpu') else ''} "
             f"(1-min load average {machine.get('load_average_1m', math.nan):.1f} when collected).",
             "", f"Runs: {', '.join(f'{n} {s}' for s, n in counts.items() if n)}. "
             f"Settings: {_settings_line(results)}. Time: {_runtime_line(results)}.",
             *_missing_lines(results), "",
             "References:", *(f"- {ref}" for ref in suite.references), "",
             "## Results", "", "Mean ± SD over finished seeds.", "",
             results_table(results, suite.columns or BASE_COLUMNS), ""]
    table, _ = claims_table(suite, results)
    parts += ["## Paper claims", "",
              "Verdict rule: a claim predicts a sign; *agrees* when our estimate has that sign and "
              f"is more than {stats.THRESHOLD_SE:g} standard errors (over seeds) from zero, "
              f"*disagrees* when it has the opposite sign by as much, *inconclusive* otherwise "
              "(experiments/library/stats.py).", "", table, ""]
    for extra in suite.tables:
        parts += [f"## {extra.name}", "", extra.caption, "", extra.build(results), ""]
    if suite.notes:
        parts += ["What this scale can show: " + suite.notes, ""]
    if figures:
        parts += ["## Figures", ""]
        for figure in suite.figures:
            name = f"{scale}_{figure.name}.png"
            path = os.path.join(out_dir, name)
            figure.draw(results, path)
            if os.path.exists(path):
                parts += [f"![{figure.name}]({name})", "", figure.caption, ""]
    parts += ["## FLOPs and parameters", "", f"Configs that ran ({scale}; routing group = one "
              "batch):", "", flops_table(suite, scale), "",
              "Paper scale (not run; the full-size configs):", "", flops_table(suite, "paper"), "",
              "## Reproduce", "", "```bash",
              f"python -m experiments.run --suite={suite.name} --scale={scale} "
              f"--seeds={max((r['seed'] for r in results.runs), default=0) + 1}",
              f"python -m experiments.report --suite={suite.name} --scale={scale}", "```", "",
              f"Each run's exact `moe_jax.main` command is in `{scale}.json` (`command`)."]
    return "\n".join(parts) + "\n"


EXPERIMENTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPRODUCTION_PATH = os.path.join(EXPERIMENTS_DIR, "REPRODUCTION.md")
BEGIN_MARK = "<!-- claims table: written by `python -m experiments.report --reproduction` -->"
END_MARK = "<!-- end of claims table -->"


def reproduction_table(found: Sequence[tuple[Suite, Results]]) -> str:
    """One row per paper claim of each (suite, results): claim, paper number, ours, verdict, and
    the commands that reproduce the row."""
    rows = []
    for suite, results in found:
        seeds = max((r["seed"] for r in results.runs), default=0) + 1
        command = (f"`python -m experiments.run --suite={suite.name} --scale={results.scale} "
                   f"--seeds={seeds} && python -m experiments.report --suite={suite.name} "
                   f"--scale={results.scale}`")
        for claim in suite.claims:
            outcome = claim.check(results)
            rows.append([f"`{suite.name}` ({results.scale})", f"**{claim.id}**: {claim.statement}",
                         claim.source, claim.paper_value, outcome.measured,
                         f"**{outcome.verdict}**", command])
    return markdown_table(["suite", "claim", "source", "paper reports", "we measured", "verdict",
                           "reproduce"], rows)


def write_reproduction(path: str = REPRODUCTION_PATH, results_root: str | None = None) -> str:
    """Replaces the block between BEGIN_MARK and END_MARK in `path` by the claims table of every
    committed results file (experiments/results/<suite>/<scale>.json); the hand-written text
    around it is kept. Returns the table."""
    results_root = results_root or os.path.join(os.path.dirname(path), "results")
    found = []
    for name, suite in sorted(suites.SUITES.items()):
        for scale in SCALES:
            file = os.path.join(results_root, name, f"{scale}.json")
            if os.path.exists(file):
                found.append((suite, Results.load(file)))
    table = reproduction_table(found)
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = f"{BEGIN_MARK}\n{END_MARK}\n"
    if BEGIN_MARK not in text or END_MARK not in text:
        raise ValueError(f"{path} lacks the markers {BEGIN_MARK!r} and {END_MARK!r} around the "
                         "claims table; put them back where the table belongs and rerun.")
    head, rest = text.split(BEGIN_MARK, 1)
    tail = rest.split(END_MARK, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN_MARK}\n\n{table}\n\n{END_MARK}{tail}")
    return table
