"""The training loop's view of the input pipeline (`moe_jax.data.pipeline`).

    inputs = make_inputs(data_config, model_config, batch_size=16, seq_len=128, seed=0)
    batch = next(inputs.train)                       # dict of [B / P, L] numpy arrays
    state = inputs.train.get_state()                 # JSON-serialisable; set_state resumes
    for batch in inputs.eval_batches(): ...          # the same validation batches every time
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax

from moe_jax.data import pipeline
from moe_jax.data.config import DataConfig
from moe_jax.models.config import ModelConfig

Batch = dict[str, Any]


class ResumableIterator(Protocol):
    def __next__(self) -> Batch: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class Inputs:
    train: ResumableIterator
    eval_batches: Callable[[], Iterable[Batch]]


def domain_names(config: DataConfig) -> tuple[str, ...]:
    """The per-example domain labels of the dataset (the embedded corpus has three), or ()."""
    if config.is_embedded:
        from moe_jax.data.corpus import DOMAINS

        return DOMAINS
    return ()


def abstract_batch(batch_size: int, seq_len: int, sharding: jax.sharding.Sharding
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and sharding of one global batch (`pipeline.BATCH_FEATURES`, each
    [B, L]): what the train step is compiled for, without reading any data."""
    return {name: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding)
            for name, dtype in pipeline.BATCH_FEATURES.items()}


def make_inputs(config: DataConfig, model_config: ModelConfig, *, batch_size: int, seq_len: int,
                seed: int) -> Inputs:
    """The train iterator and the validation batches of this process (rows [h B/P, (h+1) B/P)
    of each global batch of `batch_size` rows, for process h of P), checked against the
    model's vocabulary. The embedded corpus is built on first use."""
    hosts = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    train = pipeline.make_train_iterator(config, seq_len=seq_len, global_batch_size=batch_size,
                                         seed=seed, **hosts)
    vocab_size = pipeline.vocab_size(config)
    if vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the {config.tokenizer} tokenizer of dataset {config.name!r} has {vocab_size} "
            f"tokens but model.vocab_size={model_config.vocab_size}; set "
            f"--config.model.vocab_size={vocab_size}.")
    eval_list: list[Batch] | None = None

    def eval_batches() -> Iterator[Batch]:
        nonlocal eval_list
        if eval_list is None:
            eval_list = list(pipeline.make_eval_batches(
                config, seq_len=seq_len, global_batch_size=batch_size, **hosts))
        return iter(eval_list)

    return Inputs(train=train, eval_batches=eval_batches)
