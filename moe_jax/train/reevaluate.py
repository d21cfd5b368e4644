"""Evaluate a run's saved checkpoint again: at another step, with other evaluation settings
(router temperature, capacity factor), or on your own labelled documents. Returns the eval
metrics and the routing profile (`moe_jax.train.profiles`).

    metrics, profile = evaluate_checkpoint("runs/e8")                       # latest step
    metrics, profile = evaluate_checkpoint("runs/e8", step=100,
                                           settings={"moe.eval_router_temperature": 2.0})
    metrics, profile = evaluate_checkpoint("runs/e8", eval_data="my_docs.jsonl")

The run's config comes from its config.json (`schema.config_from_json`); `settings` change it
before the model is built, so they must keep the parameters' shapes (evaluation settings, data
settings). Only the parameters and model state are read (`checkpoint.read_weights`). Runs on
one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from moe_jax import schema
from moe_jax.data import pipeline, sources
from moe_jax.models import Transformer
from moe_jax.train import evaluate, optim, profiles
from moe_jax.train import inputs as train_input
from moe_jax.train.checkpoint import read_weights
from moe_jax.train.loop import CONFIG_FILE
from moe_jax.train.state import init_train_state
from moe_jax.utils import storage


def run_experiment(workdir: str, settings: Mapping[str, Any] | None = None) -> schema.Experiment:
    """The experiment of the run in `workdir` (its config.json), with `settings` applied."""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} is missing: {workdir} is not a run directory of "
                                "moe_jax.main (it writes config.json at start).")
    return schema.parse_config(schema.override(schema.config_from_json(path), settings or {}))


def evaluate_checkpoint(workdir: str, *, step: int | None = None,
                        settings: Mapping[str, Any] | None = None,
                        eval_data: str | None = None
                        ) -> tuple[dict[str, Any], profiles.Profile]:
    """(eval metrics as `evaluate.summarize` gives them, routing profile) of checkpoint `step`
    (default the latest) of the run in `workdir`, on its validation data or on the labelled
    documents of `eval_data` (`sources.read_labelled_documents`: JSON lines
    {"text": ..., "domain": ...})."""
    experiment = run_experiment(workdir, settings)
    seq_len = experiment.train.seq_len or experiment.model.max_seq_len
    model = Transformer(experiment.model, experiment.moe)
    optimizer = optim.make_optimizer(experiment.train)
    abstract = jax.eval_shape(lambda key: init_train_state(key, model, optimizer,
                                                           seq_len=seq_len), jax.random.key(0))
    weights, step = read_weights(workdir, abstract, step)
    source, domains = None, train_input.domain_names(experiment.data)
    if eval_data is not None:
        source, domains = sources.read_labelled_documents(eval_data)
    batches = pipeline.make_eval_batches(experiment.data, seq_len=seq_len,
                                         global_batch_size=experiment.train.batch_size,
                                         source=source)
    eval_step = jax.jit(evaluate.make_eval_step(
        model, experiment.model, experiment.moe, num_domains=len(domains),
        objective_name=experiment.train.objective, mask_rate=experiment.train.mask_rate,
        seed=experiment.seed))
    totals = evaluate.evaluate_batches(eval_step, weights["params"], weights["model_state"],
                                       batches)
    return (evaluate.summarize(totals, experiment.model, domains),
            profiles.from_totals(totals, experiment.model, experiment.moe, domains, step=step))
