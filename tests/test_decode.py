"""Decoding with the key/value cache: prefill + steps equal the full forward pass (dense and MoE,
grouped-query attention, rotary), ragged prompt batches decode each prompt as if alone, the
rolling cache keeps the last positions, sampling follows its key, the routing of the
decoded tokens is the router's, and bad input fails clearly. One MoE and one dense model of
tiny shapes; jitted functions are shared across tests."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import MoeConfig
from moe_jax.models import ModelConfig, attention, decode, transformer
from moe_jax.models.sampling import GREEDY, SamplingConfig, sample, top_k_mask, top_p_mask

CONTEXT = 16
MODEL = ModelConfig(vocab_size=50, vocab_multiple=8, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, d_ff=64, max_seq_len=CONTEXT, moe_every=1)
# Trained with a capacity that drops (gather); decoding runs it dropless.
MOE = MoeConfig(num_experts=4, top_k=2, d_ff=32, capacity_factor=0.5, dispatch="gather")
MODELS = {"moe": MODEL, "dense": MODEL.replace(moe_every=0)}
TOKENS = jax.random.randint(jax.random.key(1), (3, 12), 3, 50)


@functools.cache
def setup(kind: str):
    """(model, variables, jitted full forward with routing, jitted prefill, jitted step)."""
    model = decode.decoding_model(MODELS[kind], MOE)
    variables = model.init({"params": jax.random.key(0)}, TOKENS, train=False)

    @jax.jit
    def full(variables, tokens):
        (logits, _), collections = model.apply(variables, tokens, train=False,
                                               mutable=["routing"])
        return logits, transformer.layer_routing(collections, model.config)

    prefill = jax.jit(functools.partial(decode.prefill, model), static_argnames="cache_len")
    step = jax.jit(functools.partial(decode.step, model))
    return model, variables, full, prefill, step


def decode_logits(kind: str, tokens: jax.Array, prompt_len: int, cache_len: int) -> jax.Array:
    """[B, L - prompt_len + 1, V]: the cached model's logits at positions prompt_len - 1 ... L - 1
    (prefill of the first prompt_len tokens, then one step per token)."""
    _, variables, _, prefill, step = setup(kind)
    batch = tokens.shape[0]
    logits, state, _ = prefill(variables, tokens[:, :prompt_len],
                               jnp.full((batch,), prompt_len), cache_len=cache_len)
    out = [logits]
    for i in range(prompt_len, tokens.shape[1]):
        logits, state, _ = step(variables, state, tokens[:, i])
        out.append(logits)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_cached_decoding_equals_the_full_forward_pass_at_every_position(kind):
    _, variables, full, _, _ = setup(kind)
    expected, _ = full(variables, TOKENS)
    got = decode_logits(kind, TOKENS, prompt_len=4, cache_len=CONTEXT)
    np.testing.assert_allclose(got, expected[:, 3:], rtol=1e-5, atol=1e-5)


def test_the_rolling_cache_keeps_the_last_slots_positions():
    # 20 tokens written one at a time into 12 slots: slot p mod 12 holds position p, so the
    # cache ends with positions 8..19 and the last query sees exactly those (sliding window).
    slots, cache = 12, None
    cache = {"key": jnp.zeros((1, slots, 1, 2)), "value": jnp.zeros((1, slots, 1, 2)),
             "positions": jnp.zeros((1, slots), jnp.int32), "filled": jnp.zeros((1, slots), bool)}
    for p in range(20):
        kv = jnp.full((1, 1, 1, 2), float(p))
        cache = attention.cached_keys_values(cache, kv, kv, jnp.asarray([[p]]),
                                             jnp.ones((1, 1), jnp.int32))
        visible = attention.cache_mask(jnp.asarray([[p]]), cache)[0, 0]
        np.testing.assert_array_equal(np.sort(np.asarray(cache["positions"][0])[visible]),
                                      np.arange(max(0, p - slots + 1), p + 1))
    np.testing.assert_array_equal(cache["key"][0, :, 0, 0], [12, 13, 14, 15, 16, 17, 18, 19,
                                                             8, 9, 10, 11])
    # Padding (segment 0) is not written.
    padded = attention.cached_keys_values(cache, kv * 0, kv * 0, jnp.asarray([[20]]),
                                          jnp.zeros((1, 1), jnp.int32))
    np.testing.assert_array_equal(padded["key"], cache["key"])


def test_a_ragged_batch_decodes_each_prompt_as_if_alone():
    model, variables, full, _, _ = setup("moe")
    prompts = [TOKENS[0, :5].tolist(), TOKENS[1, :2].tolist(), TOKENS[2, :7].tolist()]
    batch = decode.generate(model, variables, *decode.pad_prompts(prompts),
                            key=jax.random.key(0), max_new_tokens=6)
    for row, prompt in enumerate(prompts):
        alone = decode.generate(model, variables, *decode.pad_prompts([prompt]),
                                key=jax.random.key(0), max_new_tokens=6)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        # The new tokens are the full model's greedy choices, and their routing is the one
        # the full forward pass sows for them.
        sequence = jnp.asarray([prompt + batch.tokens[row].tolist()])
        logits, routed = full(variables, sequence)
        greedy = jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)
        np.testing.assert_array_equal(batch.tokens[row], greedy)
        for m, layer in enumerate(routed):
            expected = layer.choice.expert_index[len(prompt):]  # [N, K] of the new tokens
            np.testing.assert_array_equal(batch.routing[m].choice.expert_index[:, row],
                                          expected)


def test_sampling_is_reproducible_from_the_key():
    model, variables, _, _, _ = setup("dense")
    prompts, lengths = decode.pad_prompts([[1, 5, 9], [1, 7]])
    config = SamplingConfig(temperature=1.5, top_k=20, top_p=0.9)

    def run(seed: int) -> np.ndarray:
        return np.asarray(decode.generate(model, variables, prompts, lengths, sampling=config,
                                          key=jax.random.key(seed), max_new_tokens=8).tokens)

    first = run(0)
    np.testing.assert_array_equal(first, run(0))
    assert not np.array_equal(first, run(1))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15]]))
    np.testing.assert_array_equal(top_k_mask(logits, 2), [[True, False, True, False]])
    # Nucleus 0.7: 0.5 (mass before 0), 0.3 (before: 0.5 < 0.7); 0.15 has 0.8 before it.
    np.testing.assert_array_equal(top_p_mask(logits, 0.7), [[True, False, True, False]])
    np.testing.assert_array_equal(top_p_mask(logits, 0.81), [[True, False, True, True]])
    np.testing.assert_array_equal(top_p_mask(logits, 0.1), [[True, False, False, False]])
    assert int(sample(jax.random.key(0), logits, GREEDY)[0]) == 0
    only_two = SamplingConfig(temperature=1.0, top_k=2)
    draws = jax.vmap(lambda k: sample(k, logits, only_two))(
        jax.random.split(jax.random.key(0), 200))
    assert set(np.unique(draws).tolist()) == {0, 2}


def test_bad_input_gets_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="longer than the model's context"):
        decode.cache_length(MODEL, CONTEXT + 1, 4)
    with pytest.raises(ValueError, match="learned position table"):
        decode.cache_length(MODEL.replace(positions="learned"), 10, 10)
    with pytest.raises(ValueError, match="bidirectional encoder"):
        decode.decoding_model(MODEL.replace(causal=False), MOE)
    with pytest.raises(ValueError, match="token-choice router"):
        decode.decoding_model(MODEL, MOE.replace(router="expert_choice", dispatch="gather",
                                                 allow_non_causal=True))
    model, variables, _, _, _ = setup("dense")
    with pytest.raises(ValueError, match="do not fit a cache"):
        decode.generate(model, variables, *decode.pad_prompts([[1] * 10]),
                        key=jax.random.key(0), max_new_tokens=2, cache_len=8)
    with pytest.raises(ValueError, match="at least one token"):
        decode.pad_prompts([[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)

    from moe_jax.train.restore import restore_run

    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        restore_run(str(tmp_path))
    from moe_jax import schema

    with open(tmp_path / "config.json", "w") as f:
        f.write(schema.base_config().to_json_best_effort())
    from moe_jax.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint"):
        restore_run(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # nothing written
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0
