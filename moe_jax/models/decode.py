"""Autoregressive decoding with a key/value cache: prefill, one-token steps, generation.

    model = decode.decoding_model(model_config, moe_config)
    variables = {"params": params, **model_state}
    out = decode.generate(model, variables, prompts, lengths, key=jax.random.key(0),
                          max_new_tokens=64, sampling=SamplingConfig(temperature=0.8, top_p=0.9))
    out.tokens                          # [B, N] the new tokens of each prompt
    out.routing[m].choice.expert_index  # [N, B, K] the experts MoE block m chose for each

or step by step (what `generate` runs, jitted):

    logits, state, routed = decode.prefill(model, variables, prompts, lengths, cache_len=256)
    logits, state, routed = decode.step(model, variables, state, next_tokens)

Shape letters: B batch (prompts), P padded prompt length, S cache slots, N new tokens,
V vocabulary, K experts per token, M MoE blocks. All functions are pure functions of the
model's variables; jit them with the model static (`generate` is).

Prompts of different lengths share a batch right-padded: prompts [B, P] with lengths [B]; row b's
tokens sit at positions 0 .. lengths[b] - 1, its padding is neither attended to nor routed nor
cached, and its first new token goes to position lengths[b], so every row decodes as if alone.
Positions are absolute and rotary embeddings are applied at them, in the cache as in the full
forward pass. The cache holds S slots per row (`attention.cached_keys_values`): up to S tokens
decoding equals the full forward pass; beyond, the cache rolls and every attention block sees
the last S positions (sliding-window attention, as Mistral 7B), so no block attends further
back than the `max_seq_len` it was trained on (rotary positions only; a learned position table
ends at max_seq_len).

MoE blocks decode dropless (`decoding_moe_config`): every token goes to its k experts, with no
capacity, so a token's output never depends on the other requests in the batch or on the
other tokens of its prompt, and prefill plus steps equal the full forward pass of the same
config. A capacity (the training `gather`/`einsum` dispatch) would couple requests: at
eval_capacity_factor c, a batch whose tokens pick the same expert more than c*k*B/E times drops
some, which depends on what else is in the batch. The routing the MoE layers sow
(`layers.ROUTING`) is returned per call, so the decoded tokens' routing statistics come from the
router itself, not a recomputation.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from moe_jax import layers, routing
from moe_jax.config import MoeConfig
from moe_jax.models import transformer
from moe_jax.models.attention import CACHE
from moe_jax.models.config import ModelConfig
from moe_jax.models.sampling import GREEDY, SamplingConfig, sample
from moe_jax.models.transformer import Transformer

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class DecodeState:
    """What decoding carries between calls.

    cache: the attention blocks' `CACHE` collection (key, value [B, S, K, h], positions and
      filled [B, S] per block).
    lengths: [B] int32 tokens of each row so far: the position of its next token.
    """

    cache: PyTree
    lengths: Array


@flax.struct.dataclass
class Generation:
    """`generate`'s result.

    tokens: [B, N] int32 new tokens (after a row's `stop_token`: `pad_token`).
    lengths: [B] int32 new tokens of each row up to and including its stop token (N if none).
    routing: per MoE block (block order) the `routing.TokenRouting` of every new token, fields
      stacked [N, B, ...] (N steps of B tokens); [] for a dense model.
    state: the decoding state after the N tokens (every new token is in the cache).
    """

    tokens: Array
    lengths: Array
    routing: list[routing.TokenRouting]
    state: DecodeState


def decoding_moe_config(moe: MoeConfig) -> MoeConfig:
    """The MoE config decoding runs: the trained one with dropless dispatch (every token to its
    k experts, no capacity; see the module docstring) and no routing groups (`group_size` only
    sets capacity and statistics, and a decoding call has as few tokens as the batch). Same
    parameters, so any checkpoint of a token-choice router decodes."""
    return moe.replace(dispatch="dropless", group_size=None)


def check_decodable(model_config: ModelConfig, moe: MoeConfig) -> None:
    """Raises ValueError unless the model can decode token by token: causal, with token-choice
    routing in its MoE blocks."""
    if not model_config.causal:
        raise ValueError("ModelConfig.causal=False: a bidirectional encoder (masked-LM) cannot "
                         "generate text token by token; decode a causal LM (causal=True).")
    if model_config.sparse_layers and not moe.is_causal_safe:
        raise ValueError(f"MoeConfig.router={moe.router!r} routes a token using the tokens after "
                         "it, so a causal decoder cannot run it one token at a time; decode a "
                         "model with a token-choice router (top_k or sigmoid_bias).")


def decoding_model(model_config: ModelConfig, moe: MoeConfig) -> Transformer:
    """The Transformer that decodes a (model_config, moe) checkpoint: checked with
    `check_decodable`, MoE blocks dropless (`decoding_moe_config`), no MoE sharding."""
    check_decodable(model_config, moe)
    return Transformer(model_config, decoding_moe_config(moe))


def init_cache(model: Transformer, variables: PyTree, batch_size: int, cache_len: int) -> PyTree:
    """An empty cache of `cache_len` slots per row for `batch_size` rows (nothing computed:
    the shapes come from tracing the model once)."""
    tokens = jnp.zeros((batch_size, cache_len), jnp.int32)
    shapes = jax.eval_shape(lambda v: model.apply(v, tokens, train=False, mutable=[CACHE])[1],
                            variables)[CACHE]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_length(model_config: ModelConfig, prompt_length: int, max_new_tokens: int) -> int:
    """Slots for a prompt of `prompt_length` tokens plus `max_new_tokens`: all of them, at most
    max_seq_len (beyond that the cache rolls; rotary positions only). Raises ValueError for a
    prompt longer than the context or a learned position table that ends too early."""
    if prompt_length > model_config.max_seq_len:
        raise ValueError(f"the prompt has {prompt_length} tokens, longer than the model's "
                         f"context ModelConfig.max_seq_len={model_config.max_seq_len}; shorten "
                         "the prompt (keep its last max_seq_len tokens).")
    total = prompt_length + max_new_tokens
    if model_config.positions == "learned" and total > model_config.max_seq_len:
        raise ValueError(f"prompt ({prompt_length}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"positions exceed the learned position table of ModelConfig."
                         f"max_seq_len={model_config.max_seq_len}; generate at most "
                         f"{model_config.max_seq_len - prompt_length} tokens.")
    return min(total, model_config.max_seq_len)


def forward(model: Transformer, variables: PyTree, state: DecodeState, tokens: Array,
            segment_ids: Array) -> tuple[Array, DecodeState, list[routing.TokenRouting]]:
    """Runs L new tokens per row through the cached model.

    tokens, segment_ids: [B, L] (segment 0: padding, after the row's real tokens). Returns
    logits [B, L, V] float32, the state with the real tokens cached, and each MoE block's
    routing of the B * L tokens.
    """
    positions = state.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    (logits, _), collections = model.apply(
        {**variables, CACHE: state.cache}, tokens, segment_ids=segment_ids, positions=positions,
        train=False, mutable=[CACHE, layers.ROUTING])
    lengths = state.lengths + jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32)
    return logits, DecodeState(collections[CACHE], lengths), transformer.layer_routing(
        collections, model.config)


def check_prompts(prompts: Array, lengths: Array, cache_len: int) -> None:
    """Shape checks of a right-padded prompt batch (values are checked where concrete)."""
    if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
        raise ValueError(f"prompts must be [batch, length] with lengths [batch]; got "
                         f"{prompts.shape} and {lengths.shape}.")
    if prompts.shape[1] > cache_len:
        raise ValueError(f"prompts of {prompts.shape[1]} tokens do not fit a cache of "
                         f"{cache_len} slots; raise cache_len (at most max_seq_len) or shorten "
                         "the prompts.")
    if not isinstance(lengths, jax.core.Tracer):
        bad = [int(n) for n in jax.device_get(lengths) if not 1 <= n <= prompts.shape[1]]
        if bad:
            raise ValueError(f"prompt lengths {bad} are outside [1, {prompts.shape[1]}]: every "
                             "prompt needs at least one token (e.g. the BOS token).")


def prefill(model: Transformer, variables: PyTree, prompts: Array, lengths: Array, *,
            cache_len: int) -> tuple[Array, DecodeState, list[routing.TokenRouting]]:
    """Caches the prompts. prompts [B, P] right-padded, lengths [B] (>= 1).

    Returns the logits of each row's last prompt token [B, V] (the next token's distribution),
    the state, and each MoE block's routing of the B * P prompt positions (padding included,
    with `keep` False).
    """
    check_prompts(prompts, lengths, cache_len)
    batch, length = prompts.shape
    state = DecodeState(init_cache(model, variables, batch, cache_len),
                        jnp.zeros((batch,), jnp.int32))
    segment_ids = (jnp.arange(length) < lengths[:, None]).astype(jnp.int32)
    logits, state, routed = forward(model, variables, state, prompts, segment_ids)
    return logits[jnp.arange(batch), lengths - 1], state, routed


def step(model: Transformer, variables: PyTree, state: DecodeState, tokens: Array
         ) -> tuple[Array, DecodeState, list[routing.TokenRouting]]:
    """One new token per row: tokens [B] -> (logits [B, V] of the next token, state, each MoE
    block's routing of the B tokens)."""
    logits, state, routed = forward(model, variables, state, tokens[:, None],
                                    jnp.ones((tokens.shape[0], 1), jnp.int32))
    return logits[:, 0], state, routed


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "cache_len",
                                             "stop_token", "pad_token"))
def _generate(model: Transformer, variables: PyTree, prompts: Array, lengths: Array, key: Array,
              *, max_new_tokens: int, sampling: SamplingConfig, cache_len: int,
              stop_token: int | None, pad_token: int) -> Generation:
    logits, state, _ = prefill(model, variables, prompts, lengths, cache_len=cache_len)
    done = jnp.zeros(prompts.shape[:1], bool)

    def body(carry, step_key):
        logits, state, done = carry
        token = jnp.where(done, pad_token, sample(step_key, logits, sampling))
        logits, state, routed = step(model, variables, state, token)
        if stop_token is not None:
            done = done | (token == stop_token)
        return (logits, state, done), (token, routed)

    keys = jax.random.split(key, max_new_tokens)
    (_, state, _), (tokens, routed) = jax.lax.scan(body, (logits, state, done), keys)
    tokens = tokens.T  # [B, N]
    if stop_token is None:
        new = jnp.full(prompts.shape[:1], max_new_tokens, jnp.int32)
    else:
        stops = tokens == stop_token
        new = jnp.where(stops.any(1), jnp.argmax(stops, 1) + 1, max_new_tokens).astype(jnp.int32)
    return Generation(tokens=tokens, lengths=new, routing=routed, state=state)


def generate(model: Transformer, variables: PyTree, prompts: Array, lengths: Array, *,
             key: Array, max_new_tokens: int, sampling: SamplingConfig = GREEDY,
             cache_len: int | None = None, stop_token: int | None = None,
             pad_token: int = 0) -> Generation:
    """Prefill, then `max_new_tokens` sampled tokens per prompt (one jitted scan).

    prompts [B, P] right-padded, lengths [B]; key: the sampling key (step i draws with the i-th
    of `jax.random.split(key, max_new_tokens)`, so the same key gives the same tokens);
    cache_len: default `cache_length(...)` (all tokens, at most max_seq_len). After a row
    samples `stop_token` it emits `pad_token` (its tokens still pass through the model, so the
    batch keeps one shape).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if cache_len is None:
        cache_len = cache_length(model.config, prompts.shape[1], max_new_tokens)
    check_prompts(prompts, lengths, cache_len)
    return _generate(model, variables, prompts, lengths, key, max_new_tokens=max_new_tokens,
                     sampling=sampling, cache_len=cache_len, stop_token=stop_token,
                     pad_token=pad_token)


def pad_prompts(prompts: list[list[int]], pad_token: int = 0) -> tuple[Array, Array]:
    """Token lists of different lengths -> (prompts [B, P] right-padded, lengths [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS token).")
    length = max(len(p) for p in prompts)
    padded = [list(p) + [pad_token] * (length - len(p)) for p in prompts]
    return jnp.asarray(padded, jnp.int32), jnp.asarray([len(p) for p in prompts], jnp.int32)
