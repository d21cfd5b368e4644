"""Data for moe_jax: the embedded corpus, tokenizers and the grain input pipeline.

The training code needs only these:
    config = DataConfig(**config.data)
    train = make_train_iterator(config, seq_len=L, global_batch_size=B, seed=seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    batch = next(train); state = train.get_state(); ...; train.set_state(state)
    for batch in make_eval_batches(config, seq_len=L, global_batch_size=B, ...): ...
    vocab_size(config)
The embedded corpus (moe_jax.data.corpus) is built on first use.
"""

from moe_jax.data.config import DataConfig
from moe_jax.data.pipeline import (
    BATCH_FEATURES,
    EvalBatches,
    TrainIterator,
    get_tokenizer,
    make_eval_batches,
    make_train_iterator,
    vocab_size,
)

__all__ = [
    "BATCH_FEATURES",
    "DataConfig",
    "EvalBatches",
    "TrainIterator",
    "get_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "vocab_size",
]
