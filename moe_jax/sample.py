"""Generate text from a trained run: `python -m moe_jax.sample --workdir=runs/main_job/switch`.

    python -m moe_jax.sample --workdir=runs/main_job/switch --prompt="def " --max_new_tokens=200
    python -m moe_jax.sample --workdir=runs/main_job/switch --prompt="import " --prompt="The " \
        --temperature=0.8 --top_p=0.95 --seed=1
    python -m moe_jax.sample --workdir=runs/converted --prompt_ids=1,15,27 --temperature=0

A run converted from Hugging Face (`moe_jax.convert --from_hf`) has its checkpoint's own
vocabulary, whose tokenizer moe_jax does not ship: give it token ids (`--prompt_ids`, already
tokenized with the model's tokenizer, BOS included if the model expects one) and read token ids
back.

restores the run's newest checkpoint (`moe_jax.train.restore.restore_run`), encodes each prompt
with the run's tokenizer after a BOS token (as the training data starts every document),
decodes with the key/value cache (`moe_jax.models.decode`; MoE blocks dropless) and prints
each continuation (bytes that are not valid UTF-8 print as U+FFFD) and the decoding speed:
new tokens per second of the compiled generation, compilation excluded. For MoE models it also
prints how often each expert of each MoE block was chosen for the new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging

from moe_jax.data import pipeline
from moe_jax.models import decode
from moe_jax.models.sampling import SamplingConfig
from moe_jax.train.checkpoint import CheckpointError
from moe_jax.train.restore import restore_run

FLAGS = flags.FLAGS


def expert_counts(generation: decode.Generation) -> list[np.ndarray]:
    """Per MoE block, [E] how many of the new tokens (up to each row's stop) chose each expert
    (any of their k choices)."""
    n = generation.tokens.shape[1]
    valid = np.arange(n)[:, None] < np.asarray(generation.lengths)[None, :]  # [N, B]
    counts = []
    for routed in generation.routing:
        index = np.asarray(routed.choice.expert_index)[valid]  # [tokens, K]
        counts.append(np.bincount(index.reshape(-1), minlength=routed.num_experts))
    return counts


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """"1,15,27" -> [1, 15, 27], each id checked against the model's vocabulary."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt_ids={text!r} is not a comma-separated list of token ids; "
                         "write e.g. --prompt_ids=1,15,27.") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if not ids or bad:
        raise ValueError(f"--prompt_ids={text!r}: {'ids ' + str(bad) if bad else 'no ids'} "
                         f"outside the model's vocabulary [0, {vocab_size}); give at least one "
                         "id below the vocabulary size.")
    return ids


def run(workdir: str, prompts: Sequence[str], *, max_new_tokens: int,
        sampling: SamplingConfig, seed: int, step: int | None = None,
        prompt_ids: Sequence[str] = ()) -> list[str]:
    """Generates a continuation of each prompt (text, or with `prompt_ids` comma-separated
    token ids, whose continuations are token ids); prints them and the speed; returns them."""
    restored = restore_run(workdir, step)
    experiment = restored.experiment
    model = decode.decoding_model(experiment.model, experiment.moe)
    tokenizer = pipeline.get_tokenizer(experiment.data)
    if prompt_ids:  # the model's own token ids: no tokenizer, no stop token
        encoded = [parse_ids(text, experiment.model.vocab_size) for text in prompt_ids]
        prompts, pad, stop = list(prompt_ids), 0, None

        def detokenize(row: np.ndarray) -> str:
            return "," + ",".join(str(int(t)) for t in row)
    else:
        if experiment.model.vocab_size > tokenizer.vocab_size:
            raise ValueError(
                f"the model in {workdir} has a vocabulary of {experiment.model.vocab_size} "
                f"tokens but its data tokenizer ({tokenizer!r}) has {tokenizer.vocab_size}: the "
                "model was converted from a checkpoint whose own tokenizer moe_jax does not "
                "ship, so text cannot be encoded or decoded here. Tokenize with the model's own "
                "tokenizer and pass the ids (--prompt_ids=1,15,27), or train the model on "
                "moe_jax's data first.")
        encoded = [[tokenizer.bos_id, *tokenizer.encode(p).tolist()] for p in prompts]
        pad, stop, detokenize = tokenizer.pad_id, tokenizer.eos_id, tokenizer.decode
    tokens, lengths = decode.pad_prompts(encoded, pad)
    kwargs = dict(key=jax.random.key(seed), max_new_tokens=max_new_tokens, sampling=sampling,
                  stop_token=stop, pad_token=pad)
    jax.block_until_ready(decode.generate(model, restored.variables, tokens, lengths, **kwargs))
    start = time.perf_counter()  # the second call runs the compiled generation
    out = jax.block_until_ready(decode.generate(model, restored.variables, tokens, lengths,
                                                **kwargs))
    seconds = time.perf_counter() - start
    texts = []
    for prompt, row, n in zip(prompts, np.asarray(out.tokens), np.asarray(out.lengths),
                              strict=True):
        text = prompt + detokenize(row[:n])
        texts.append(text)
        print(text)
        print("-" * 72)
    new_tokens = len(prompts) * max_new_tokens
    print(f"{new_tokens} tokens in {seconds:.3f} s: {new_tokens / seconds:.1f} tokens/s "
          f"(batch {len(prompts)}, prefill included, compilation excluded; checkpoint step "
          f"{restored.step} of {workdir})")
    for layer, counts in zip(experiment.model.sparse_layers, expert_counts(out), strict=True):
        print(f"block {layer} experts chosen by the new tokens: {counts.tolist()}")
    return texts


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass flags only.")
    if not FLAGS["verbosity"].present:  # orbax logs every restore step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                  top_p=FLAGS.top_p)
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    try:
        run(FLAGS.workdir, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
            sampling=sampling, seed=FLAGS.seed, step=FLAGS.step, prompt_ids=FLAGS.prompt_ids)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A run directory written by moe_jax.main.",
                        required=True)
    flags.DEFINE_multi_string("prompt", ["def "], "Prompt text; repeat for a batch of prompts.")
    flags.DEFINE_multi_string("prompt_ids", [], "A prompt as comma-separated token ids of the "
                              "model's own tokenizer (instead of --prompt; repeat for a batch).")
    flags.DEFINE_integer("max_new_tokens", 200, "New tokens per prompt.")
    flags.DEFINE_float("temperature", 0.8, "0 = greedy; else logits / temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (1 = all).")
    flags.DEFINE_integer("seed", 0, "Sampling key.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    app.run(main)
