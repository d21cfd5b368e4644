"""The routing_drift suite's fine-tuning stage, run after each pretraining run:

    python -m experiments.analyses.drift_finetune \
        --workdir=experiments/results/routing_drift/runs/tiny/pretrain_s0

For the pretrained run in DIR (trained on code and prose only), each variant of
`routing_drift.VARIANTS`
fine-tunes a copy on math (`FINETUNE`: a new run in DIR/finetune/<variant> started from DIR's
weights with `init.checkpoint`, a fresh optimizer and step 0), then the fine-tuned checkpoint
is evaluated on the whole validation split of the embedded corpus (every domain). Compared with
the pretrained run's final evaluation: held-out loss per domain (forgetting of code and prose,
gain on math), routing drift per MoE layer (`profiles.drift`: JS divergence of the expert
shares), MaxVio and router entropy after fine-tuning, and the alarms the monitor raised while
fine-tuning. Then the plain fine-tuned router is evaluated at each router temperature of
`TEMPERATURES` (`moe.eval_router_temperature`): loss, MaxVio, entropy. Writes DIR/analysis.json.

Fine-tuning data: the math documents of `embedded_tiny` (~31 KB, ~30k byte tokens), seen ~10
times in `FINETUNE`'s steps: a small target task that can be over-fitted, as in Switch's
fine-tuning on downstream tasks (Sec. 2.4), which is where expert dropout is meant to help.
Sized for the tiny scale (steps: half of the pretraining run's). A killed analysis resumes: a
finished variant is evaluated again from its checkpoint, an unfinished one restarts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from experiments.runner import run_dir
from experiments.suites.routing_drift import (
    EVALUATION,
    FINETUNE,
    FINETUNE_FRACTION,
    TEMPERATURES,
    VARIANTS,
)
from moe_jax import schema
from moe_jax.train import monitor, profiles, reevaluate
from moe_jax.train.loop import CONFIG_FILE, SUMMARY_FILE, train_and_evaluate
from moe_jax.train.metrics import write_json
from moe_jax.utils import cli

FINETUNE_DIR = "finetune"
ANALYSIS_FILE = "analysis.json"


def finetune_settings(pretrain: schema.Experiment, workdir: str) -> dict[str, Any]:
    """`FINETUNE` with the steps sized from the pretraining run and its weights as the start."""
    steps = max(1, round(pretrain.train.num_train_steps * FINETUNE_FRACTION))
    return {**FINETUNE, "train.num_train_steps": steps, "train.warmup_steps": steps // 10,
            "init.checkpoint": os.path.abspath(workdir)}


def routing_summary(profile: profiles.Profile) -> dict[str, dict[str, float]]:
    """Per layer: MaxVio of the overall assignment share, mean router entropy and dropped share
    (token-weighted over the domains)."""
    def mean(entry: dict[str, Any], key: str) -> float | None:
        values = [d[key] for d in entry.values()]
        if None in values:
            return None
        tokens = np.array([d["tokens"] for d in entry.values()])
        return float(tokens @ np.array(values) / tokens.sum())

    return {str(layer): {
        "max_violation": monitor.max_violation(profiles.overall_share(profile, layer)),
        "entropy": mean(profile["per_layer"][str(layer)], "entropy"),
        "dropped": mean(profile["per_layer"][str(layer)], "dropped")}
        for layer in profile["layers"]}


def domain_losses(metrics: dict[str, Any], domains: Sequence[str]) -> dict[str, float]:
    return {d: metrics[f"domain/{d}/loss"] for d in domains if f"domain/{d}/loss" in metrics}


def finetune(workdir: str, name: str, settings: dict[str, Any]) -> str:
    """Trains variant `name` in workdir/finetune/<name> (resuming or skipping if done)."""
    target = os.path.join(workdir, FINETUNE_DIR, name)
    config = schema.override(schema.config_from_json(os.path.join(workdir, CONFIG_FILE)),
                             {**settings, **VARIANTS[name]})
    if not os.path.exists(os.path.join(target, SUMMARY_FILE)):
        print(f"fine-tuning {name} in {target}", flush=True)
        train_and_evaluate(config, target)
    return target


def analyse(workdir: str) -> dict[str, Any]:
    pretrain = reevaluate.run_experiment(workdir)
    saved = profiles.steps(workdir)
    if not saved:
        raise FileNotFoundError(f"{workdir} has no routing profile: train it to the end first.")
    before = profiles.load(workdir, saved[-1])
    domains = before["domains"]
    summary = run_dir.read_json(os.path.join(workdir, SUMMARY_FILE))
    if summary is None:
        raise FileNotFoundError(f"{workdir} has no {SUMMARY_FILE}: train it to the end first.")
    before_metrics = summary["eval"]
    settings = finetune_settings(pretrain, workdir)
    out: dict[str, Any] = {
        "pretrain": {"step": before["step"], "loss": domain_losses(before_metrics, domains),
                     "routing": routing_summary(before)},
        "layers": before["layers"], "domains": domains, "num_experts": before["num_experts"],
        "finetune_settings": settings, "variant_settings": VARIANTS, "variants": {},
        "temperatures": []}
    for name in VARIANTS:
        target = finetune(workdir, name, settings)
        metrics, after = reevaluate.evaluate_checkpoint(target, settings=EVALUATION)
        alarms = monitor.read_alerts(target)
        loss = domain_losses(metrics, domains)
        out["variants"][name] = {
            "loss": loss, "loss_change": {d: loss[d] - out["pretrain"]["loss"][d] for d in loss},
            "drift": profiles.drift(before, after), "routing": routing_summary(after),
            "alarms": {kind: sum(a["kind"] == kind for a in alarms) for kind in
                       sorted({a["kind"] for a in alarms})},
            "alarm_messages": [a["message"] for a in alarms[:5]]}
        if name == "plain":
            for temperature in TEMPERATURES:  # 1.0 is the evaluation above
                metrics_t, profile_t = (metrics, after) if temperature == 1.0 else \
                    reevaluate.evaluate_checkpoint(target, settings={
                        **EVALUATION, "moe.eval_router_temperature": temperature})
                out["temperatures"].append({
                    "temperature": temperature, "loss": metrics_t["loss"],
                    "loss_by_domain": domain_losses(metrics_t, domains),
                    "routing": routing_summary(profile_t)})
    return out


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "a finished pretraining run", flag_values=values)
    flags.mark_flag_as_required("workdir", flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    analysis = analyse(args.workdir)
    path = os.path.join(args.workdir, ANALYSIS_FILE)
    write_json(path, analysis)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
