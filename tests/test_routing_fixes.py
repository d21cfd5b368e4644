"""The routing fixes as options: expert dropout (moe.expert_dropout), the router temperature
(moe.router_temperature / eval_router_temperature), the frozen router (train.freeze_router),
the training-domain filter (data.train_domains), labelled evaluation documents, and reading a
run's config.json back. Runs that use them end to end are in tests/test_routing_health.py."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import experts, moe, routing, schema
from moe_jax.config import MoeConfig
from moe_jax.data import pipeline, sources
from moe_jax.data.config import DataConfig
from moe_jax.train import optim
from moe_jax.train.config import TrainConfig

D = 16
BASE = MoeConfig(num_experts=4, top_k=1, d_ff=32, capacity_factor=2.0)


@pytest.fixture(scope="module")
def layer():
    params = moe.init_params(jax.random.key(0), BASE, D)
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    return params, x


# --- expert dropout --------------------------------------------------------------------------


def test_expert_dropout_drops_hidden_units_at_its_rate_and_keeps_the_mean():
    params = experts.init_ffn(jax.random.key(0), D, 256, "relu")
    x = jax.random.normal(jax.random.key(1), (64, D))
    hidden = jax.nn.relu(x @ params["wi"])
    # wo = identity on the hidden units shows them: ffn returns the dropped hidden activations.
    eye = {"wi": params["wi"], "wo": jnp.eye(256)}
    out = jax.jit(lambda p, x, key: experts.ffn(p, x, "relu", experts.Dropout(0.4, key)))(
        eye, x, jax.random.key(2))
    active = hidden > 0
    zeroed = float(jnp.mean(out[active] == 0))
    assert 0.36 < zeroed < 0.44, zeroed
    kept = out[active & (out != 0)] / hidden[active & (out != 0)]
    np.testing.assert_allclose(kept, 1 / 0.6, rtol=1e-5)  # inverted dropout
    np.testing.assert_array_equal(experts.ffn(eye, x, "relu"), hidden)


def apply(params, x, config: MoeConfig, train: bool, rng=None):
    """`moe.apply`, jitted (one compilation instead of an op-by-op run)."""
    return jax.jit(functools.partial(moe.apply, config=config, train=train))(params, x, rng=rng)


@pytest.mark.parametrize("dispatch", ["gather", "dropless"])
def test_expert_dropout_acts_in_training_only_and_needs_the_rng(layer, dispatch):
    params, x = layer
    plain = BASE.replace(dispatch=dispatch)
    dropped = plain.replace(expert_dropout=0.4)
    reference, _ = apply(params, x, plain, True)
    a, _ = apply(params, x, dropped, True, jax.random.key(3))
    b, _ = apply(params, x, dropped, True, jax.random.key(4))
    assert not np.allclose(a, reference) and not np.allclose(a, b)
    evaluated, _ = apply(params, x, dropped, False)  # capacity factor 2 in both: no jitter
    np.testing.assert_array_equal(evaluated, reference)
    with pytest.raises(ValueError, match="expert dropout; pass rng"):
        apply(params, x, dropped, True)


def test_expert_dropout_leaves_the_other_random_streams_alone(layer):
    """split(rng, 3)[:2] == split(rng): jitter draws the same noise with expert dropout on."""
    params, x = layer
    jitter = BASE.replace(jitter_eps=0.1)
    _, aux = apply(params, x, jitter, True, jax.random.key(5))
    _, aux_dropout = apply(params, x, jitter.replace(expert_dropout=0.3), True,
                           jax.random.key(5))
    np.testing.assert_array_equal(aux["expert_load"], aux_dropout["expert_load"])


# --- router temperature ------------------------------------------------------------------------


def route(logits, config: MoeConfig, train: bool) -> routing.Routing:
    return jax.jit(functools.partial(routing.route, config=config, num_groups=1,
                                     train=train))(logits)


def test_temperature_divides_the_logits_before_the_softmax():
    logits = jax.random.normal(jax.random.key(0), (32, 4)) * 3
    hot = BASE.replace(router_temperature=2.0)
    routed = route(logits, hot, True)
    np.testing.assert_allclose(routed.tokens.probs, jax.nn.softmax(logits / 2.0), rtol=1e-6)
    np.testing.assert_array_equal(routed.tokens.logits, logits)  # raw logits, re-routable
    cold = route(logits, BASE, True)
    # top-k choices are the same at every temperature (softmax is monotone); gates and
    # entropy are not.
    np.testing.assert_array_equal(routed.tokens.choice.expert_index,
                                  cold.tokens.choice.expert_index)
    assert float(routed.statistics["router_entropy"]) > float(cold.statistics["router_entropy"])
    assert float(routed.statistics["max_router_logit"]) == pytest.approx(
        float(jnp.max(logits)) / 2.0)


def test_evaluation_temperature_applies_when_not_training():
    logits = jax.random.normal(jax.random.key(1), (16, 4))
    config = BASE.replace(eval_router_temperature=4.0)
    assert config.temperature(train=True) == 1.0 and config.temperature(train=False) == 4.0
    train = route(logits, config, True)
    evaluation = route(logits, config, False)
    np.testing.assert_allclose(train.tokens.probs, jax.nn.softmax(logits), rtol=1e-6)
    np.testing.assert_allclose(evaluation.tokens.probs, jax.nn.softmax(logits / 4.0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"router_temperature=0.0 must be a finite number > 0"):
        BASE.replace(router_temperature=0.0)
    with pytest.raises(ValueError, match=r"expert_dropout=1\.0 must be in"):
        BASE.replace(expert_dropout=1.0)


# --- frozen router -----------------------------------------------------------------------------


def test_frozen_router_gets_no_update_and_no_weight_decay():
    params = {"block_1": {"moe": {"router": {"kernel": jnp.ones((4, 2))},
                                  "experts": {"wi": jnp.ones((2, 4, 3))}}},
              "embedding": jnp.ones((5, 4))}
    grads = jax.tree.map(jnp.ones_like, params)
    frozen = TrainConfig(freeze_router=True, warmup_steps=0, weight_decay=0.1)
    optimizer = optim.make_optimizer(frozen)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["block_1"]["moe"]["router"]["kernel"], 1.0)
    assert not np.allclose(new["block_1"]["moe"]["experts"]["wi"], 1.0)
    assert not np.allclose(new["embedding"], 1.0)
    # the same updates as the unfrozen optimizer everywhere else
    plain = optim.make_optimizer(frozen.replace(freeze_router=False))
    plain_updates, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    np.testing.assert_allclose(updates["embedding"], plain_updates["embedding"], rtol=1e-6)


# --- data: training domains, labelled documents -----------------------------------------------


def test_train_domains_keep_only_those_documents(data_dir):
    config = DataConfig(name="embedded_tiny", data_dir=data_dir, train_domains="math")
    batch = next(pipeline.make_train_iterator(config, seq_len=64, global_batch_size=4, seed=0))
    labels = set(np.unique(batch["domains"][batch["weights"] > 0]).tolist())
    assert labels == {2}  # math
    state = pipeline.make_train_iterator(config, seq_len=64, global_batch_size=4,
                                         seed=0).get_state()
    assert state["pipeline"]["train_domains"] == "math"
    default = pipeline.make_train_iterator(config.replace(train_domains=""), seq_len=64,
                                           global_batch_size=4, seed=0)
    assert "train_domains" not in default.get_state()["pipeline"]  # old checkpoints resume


@pytest.mark.parametrize("changes, message", [
    ({"train_domains": "maths"}, "train_domains='maths' names an unknown or repeated domain"),
    ({"train_domains": "code,code"}, "names an unknown or repeated domain"),
    ({"name": "lm1b", "train_domains": "code"}, "needs domain labels"),
])
def test_train_domain_errors_name_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**changes)


def test_labelled_documents_and_their_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "x = 1", "domain": "code"}) + "\n\n"
                    + json.dumps({"text": "Hello.", "domain": "chat"}) + "\n"
                    + json.dumps({"text": "y = 2", "domain": "code"}) + "\n")
    source, names = sources.read_labelled_documents(str(path))
    assert names == ("code", "chat")
    assert [r["domain"] for r in source.records] == [0, 1, 0]
    batches = list(pipeline.make_eval_batches(DataConfig(), seq_len=16, global_batch_size=2,
                                              source=source))
    assert set(np.unique(batches[0]["domains"]).tolist()) <= {-1, 0, 1}
    path.write_text('{"text": "no domain"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:1 is not a labelled document.*'domain'"):
        sources.read_labelled_documents(str(path))


def test_a_runs_config_json_reads_back(tmp_path):
    config = schema.override(schema.base_config(), {"moe.num_experts": 16,
                                                    "model.moe_layers": (1, 3),
                                                    "monitor.stop_on": ("collapse",)})
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort(indent=2))
    assert schema.parse_config(schema.config_from_json(str(path))) == schema.parse_config(config)
    saved = json.loads(path.read_text())
    del saved["monitor"]  # a run from before the monitor existed keeps the defaults
    path.write_text(json.dumps(saved))
    assert schema.parse_config(schema.config_from_json(str(path))).monitor == \
        schema.parse_config(schema.base_config()).monitor
