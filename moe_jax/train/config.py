"""`TrainConfig`: optimiser, schedule, batch and bookkeeping settings of a run, validated once.

The defaults are the main job's (`python -m moe_jax.main` with no arguments): a tiny model on
the embedded corpus, sized to finish on 2 CPU cores in a few minutes. Larger configs set their
own `train` section. Activation precision is a model setting (`model.dtype="bfloat16"` with
`model.param_dtype="float32"`; the router always runs in `moe.router_dtype`, float32 by default).
"""

from __future__ import annotations

import dataclasses

from moe_jax import validation

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant")
OBJECTIVES = ("causal_lm", "masked_lm")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop (`moe_jax.train.loop.train_and_evaluate`)."""

    num_train_steps: int = 500
    # "causal_lm": next-token prediction (the data pipeline's targets; needs model.causal=True).
    # "masked_lm": BERT-style masked LM (`objective.mask_for_mlm`: targets are the original
    # inputs at the corrupted positions; needs a bidirectional encoder, model.causal=False).
    objective: str = "causal_lm"
    mask_rate: float = 0.15  # masked_lm: share of real tokens selected (BERT, Sec. 3.1)
    batch_size: int = 16  # global batch, in sequences (split over grad_accum_steps micro-batches)
    seq_len: int | None = None  # None = model.max_seq_len
    grad_accum_steps: int = 1  # micro-batches per step; batch_size must be a multiple of it
    optimizer: str = "adamw"  # "adamw" (Loshchilov & Hutter 2019) or "adafactor" (Shazeer 2018)
    learning_rate: float = 3e-3  # peak learning rate, reached after warmup
    # "cosine": linear warmup, then cosine decay to learning_rate * end_lr_ratio at the last step.
    # "rsqrt": linear warmup, then learning_rate * sqrt(warmup_steps / step) (T5, Raffel et al.
    # 2020, with the peak at the end of warmup). "constant": warmup, then flat.
    schedule: str = "cosine"
    warmup_steps: int = 50
    end_lr_ratio: float = 0.1
    # Decoupled weight decay (AdamW; Adafactor's weight_decay_rate), on matrices only: embeddings,
    # kernels and experts decay; norm scales and biases (1-D parameters) do not.
    weight_decay: float = 0.1
    # AdamW moments and epsilon. Adafactor uses optax's defaults (factored second moment with
    # decay 0.8, no momentum, update clipping 1.0, parameter-scale updates), as T5 does.
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # global-norm clipping threshold; 0 disables
    log_every: int = 25  # train metrics to TensorBoard / metrics.jsonl, and the NaN check
    eval_every: int = 250  # 0: evaluate only at the end
    checkpoint_every: int = 250  # 0: checkpoint only at the end
    max_to_keep: int = 2  # checkpoints kept in workdir/checkpoints (older ones are deleted)
    async_checkpointing: bool = True  # write checkpoints in a background thread
    progress_bar: bool = True  # tqdm bar on the console (process 0 only)

    def __post_init__(self) -> None:
        for name in ("num_train_steps", "batch_size", "grad_accum_steps", "log_every",
                     "max_to_keep"):
            validation.integer(self, name, minimum=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            validation.integer(self, name, minimum=0)
        validation.integer(self, "seq_len", minimum=1, optional=True,
                           fix="None uses model.max_seq_len")
        if self.batch_size % self.grad_accum_steps:
            validation.fail(self, "batch_size", f"is not a multiple of grad_accum_steps="
                            f"{self.grad_accum_steps}", "each micro-batch must hold the same "
                            "number of sequences")
        validation.one_of(self, "optimizer", OPTIMIZERS)
        validation.one_of(self, "objective", OBJECTIVES)
        validation.one_of(self, "schedule", SCHEDULES)
        validation.number(self, "mask_rate", above=0, below=1, fix="BERT uses 0.15")
        for name in ("learning_rate", "eps"):
            validation.number(self, name, above=0)
        for name in ("weight_decay", "grad_clip_norm"):
            validation.number(self, name, at_least=0)
        for name in ("b1", "b2", "end_lr_ratio"):
            validation.number(self, name, at_least=0, at_most=1)
        if self.warmup_steps > self.num_train_steps:
            validation.fail(self, "warmup_steps", f"exceeds num_train_steps="
                            f"{self.num_train_steps}", "shorten the warmup or train longer")
        for name in ("progress_bar", "async_checkpointing"):
            validation.boolean(self, name)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
