"""Training-time parity with Hugging Face: the gradients of the next-token loss w.r.t. each
family's imported parameters, mapped back to the checkpoint's tensor names by the export table
(`hf_weights.tensors`), equal transformers' autograd gradients saved with the fixture
(tests/fixtures/hf/<family>/gradients.npz; gradients.json says how they were computed: mean
cross-entropy of logits[:, :-1] against input_ids[:, 1:], float32, no auxiliary losses)."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import interop, layers, schema
from moe_jax.interop import hf_weights
from moe_jax.models import Transformer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen2", "deepseek_v3",
            "llama4_text", "gpt_oss")
FAST = ("mixtral", "deepseek_v3", "llama4_text", "gpt_oss")
# transformers' float32 gradients are within ~3e-6 of its float64 ones (gradients.json).
RTOL = 1e-4


def next_token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits[:, :-1] [B, L-1, V] against ids[:, 1:], in float32."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]))


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(model: Transformer, params, state, ids):
    def loss(p):
        logits, _ = model.apply({"params": p, **state}, ids, train=False)
        return next_token_loss(logits, ids)
    return jax.value_and_grad(loss)(params)


def hf_gradients(family: str) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, {HF tensor name: gradient}) of the imported fixture of `family`."""
    directory = os.path.join(FIXTURES, family)
    imported = interop.load(directory)
    experiment = schema.parse_config(imported.config)
    ids = jnp.asarray(np.load(os.path.join(directory, "expected.npz"))["input_ids"])
    model = Transformer(experiment.model, experiment.moe)
    loss, grads = _loss_and_grads(model, imported.variables["params"],
                                  imported.variables["model_state"], ids)
    grads = jax.tree.map(np.asarray, grads)
    out: dict[str, np.ndarray] = {}
    tied = bool(imported.hf.get("tie_word_embeddings"))
    for tensor in hf_weights.tensors(imported.family, experiment.model, experiment.moe):
        if tensor.path[0] == layers.STATE:
            continue
        value = functools.reduce(lambda tree, key: tree[key], tensor.path, grads)
        names = ("model.embed_tokens.weight",) if tied and tensor.path == ("output",) \
            else tensor.names
        for name, array in zip(names, tensor.to_hf(value), strict=True):
            out[name] = out[name] + array if name in out else array  # tied: both uses
    return float(loss), out


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_gradients_match_transformers(family):
    with open(os.path.join(FIXTURES, family, "gradients.json")) as f:
        reference = json.load(f)
    expected = dict(np.load(os.path.join(FIXTURES, family, "gradients.npz")))
    loss, grads = hf_gradients(family)
    np.testing.assert_allclose(loss, reference["loss"], rtol=1e-5)
    assert sorted(grads) == sorted(expected)
    for name, ref in expected.items():
        if name in reference["zero_tensors"]:  # experts no token chose
            assert not np.any(grads[name]), name
            continue
        error = np.linalg.norm(grads[name] - ref) / np.linalg.norm(ref)
        assert error <= RTOL, f"{name}: relative error {error:.2e}"
