"""Which expert-parallel form? The collectives of `gspmd` and `explicit` side by side for every
published model of experiments/scale/run.py (`run.PUBLISHED`), from the dry runs recorded in
results.jsonl, and the form with the smaller communication bound.

    python -m experiments.scale.expert_parallel     # writes expert_parallel.md

Both forms are compiled with the same fixed capacity (capacity factor 1.25, one routing group
per sequence: what the explicit form needs), so they do the same expert computation and differ
in how tokens reach the experts: `gspmd` lets the compiler partition the dispatch, `explicit`
exchanges them with one all-to-all over the expert axis each way (moe_jax.parallel). A model
with no record yet shows as not compiled (`python -m experiments.scale.run --only=NAME`).
"""

from __future__ import annotations

import pathlib
from typing import Any

from experiments.scale import run
from moe_jax.analysis import dryrun_report
from moe_jax.utils import cli

HERE = pathlib.Path(__file__).parent
TABLE = HERE / "expert_parallel.md"
FORMS = {"gspmd": "gspmd cf1.25", "explicit": "explicit"}  # form -> case name suffix
KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
# The forms' communication bounds count as equal within this fraction.
TIE = 0.05
COLUMNS = ("model", "topology", "form", *(f"{k} GiB (s)" for k in KINDS), "ICI bound s",
           "est. step: overlap / serial", "peak GiB", "fewer ICI seconds",
           "shorter overlap step")


def _kind(report: dryrun_report.Report, kind: str) -> str:
    c = report.collectives.get(kind)
    if c is None:
        return "-"
    return (f"{c['result_bytes_per_step'] / dryrun_report.GIB:.3g} "
            f"({report.communication_seconds[kind]:.3g})")


def choose(ici_seconds: dict[str, float], tie: float = TIE) -> str:
    """The form with the smaller communication bound, or "either" when they are within `tie`
    of the larger."""
    (low_form, low), (_, high) = sorted(ici_seconds.items(), key=lambda item: item[1])
    return "either" if high - low <= tie * high else low_form


def rows(results: dict[str, dict[str, Any]]
         ) -> tuple[list[tuple[str, ...]], dict[str, int], dict[str, int]]:
    """The table's rows and how often each form was chosen by its ICI bound and by its overlap
    step estimate."""
    out, tally, by_step = [], {}, {}
    for name, (_, meshes) in run.PUBLISHED.items():
        for topology in meshes:
            reports = {form: results.get(f"{name} {suffix} @ {topology}")
                       for form, suffix in FORMS.items()}
            reports = {form: run.load_report(row["report"]) if row else None
                       for form, row in reports.items()}
            if not all(r is not None and r.compiled for r in reports.values()):
                out.append((name, topology, "not compiled", *("-",) * (len(COLUMNS) - 3)))
                continue
            ici = {f: r.estimate["communication_seconds"] for f, r in reports.items()}
            choice = choose(ici)
            tally[choice] = tally.get(choice, 0) + 1
            step = choose({f: r.estimate["overlap_step_seconds"] for f, r in reports.items()})
            by_step[step] = by_step.get(step, 0) + 1
            for form, r in reports.items():
                e = r.estimate
                mark = run.LEGACY_MARK if r.config.endswith(run.LEGACY_MARK) else ""
                out.append((name + mark, topology, form,
                            *(_kind(r, k) for k in KINDS), f"{ici[form]:.3g}",
                            f"{e['overlap_step_seconds']:.3g} / {e['serial_step_seconds']:.3g}",
                            f"{r.bytes['peak'] / dryrun_report.GIB:.3g}",
                            *((choice, step) if form == "gspmd" else ("", ""))))
    return out, tally, by_step


def write() -> str:
    table, tally, by_step = rows(run.read_results())
    summary, step_summary = (", ".join(f"{choice} {n}" for choice, n in sorted(counts.items()))
                             for counts in (tally, by_step))
    text = "\n".join([
        "# Expert-parallel form: gspmd vs explicit", "",
        "Per device and train step, from `python -m experiments.scale.run`'s records "
        "(results.jsonl): the result GiB of each collective kind and, in brackets, its "
        "communication lower bound in seconds (moe_jax.analysis.communication); the two step "
        "estimates; the peak memory; the form whose ICI bound is smaller and the form whose "
        f"overlap step estimate is (`either` within {TIE:.0%}). Written by "
        "`python -m experiments.scale.expert_parallel`.", "",
        cli.markdown_table(COLUMNS, table), "",
        f"Fewer ICI seconds per model and topology: {summary or 'none compiled'}; shorter "
        f"overlap step: {step_summary or 'none compiled'}.", "",
        f"{run.LEGACY_MARK.strip()} Recorded before the dry run read group sizes: each "
        "all-to-all is taken over the expert axis, the other collectives over all devices; "
        "an asynchronous collective-permute-start, where the program has one, counted operand "
        "and result."])
    TABLE.write_text(text + "\n")
    return text


if __name__ == "__main__":
    print(write())
