"""Routing math on hand-made probability matrices: every expected number is written out here and
can be checked with pencil and paper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import losses, routing
from moe_jax.config import MoeConfig

# 4 tokens, 2 experts. Top-1 choices: token 0 -> e0 (.7), 1 -> e0 (.6), 2 -> e1 (.8), 3 -> e0 (.9).
PROBS_4x2 = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])

# 3 tokens, 3 experts. Top-2: t0 -> (e0 .5, e1 .3); t1 -> (e0 .6, e2 .3); t2 -> (e2 .7, e1 .2).
PROBS_3x3 = jnp.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.1, 0.2, 0.7]])


def slots_of(probs, k, capacity, priority="rank", renormalize=False):
    choice = routing.route_top_k(probs, k, renormalize=renormalize)
    slots = routing.assign_slots(choice, capacity, probs.shape[1], priority, probs.max(-1))
    return choice, slots


def test_top1_rank_priority_drops_later_tokens():
    # Capacity 1: expert 0 keeps its earliest token (0); tokens 1 and 3 are dropped.
    _, slots = slots_of(PROBS_4x2, k=1, capacity=1)
    np.testing.assert_array_equal(slots.token, [[0], [2]])
    np.testing.assert_allclose(slots.gate, [[0.7], [0.8]])
    np.testing.assert_array_equal(slots.kept[:, 0], [True, False, True, False])


def test_top1_batch_priority_keeps_most_confident_token():
    # Priority order by top-1 probability: t3 (.9), t2 (.8), t0 (.7), t1 (.6): expert 0 keeps t3.
    _, slots = slots_of(PROBS_4x2, k=1, capacity=1, priority="batch_priority")
    np.testing.assert_array_equal(slots.token, [[3], [2]])
    np.testing.assert_allclose(slots.gate, [[0.9], [0.8]])
    np.testing.assert_array_equal(slots.kept[:, 0], [False, False, True, True])


def test_top1_capacity_two_fills_slots_in_token_order():
    _, slots = slots_of(PROBS_4x2, k=1, capacity=2)
    # Expert 0: t0, t1 (t3 dropped); expert 1: t2 then an empty slot (token index T = 4).
    np.testing.assert_array_equal(slots.token, [[0, 1], [2, 4]])
    np.testing.assert_allclose(slots.gate, [[0.7, 0.6], [0.8, 0.0]])


def test_top2_rank_priority_places_all_first_choices_before_second_choices():
    # Capacity 1. First choices in token order: t0 -> e0 (slot 0), t1 -> e0 (full: dropped),
    # t2 -> e2 (slot 0). Second choices: t0 -> e1 (slot 0), t1 -> e2 (full), t2 -> e1 (full).
    _, slots = slots_of(PROBS_3x3, k=2, capacity=1)
    np.testing.assert_array_equal(slots.token, [[0], [0], [2]])
    np.testing.assert_allclose(slots.gate, [[0.5], [0.3], [0.7]])
    np.testing.assert_array_equal(slots.kept, [[True, True], [False, False], [True, False]])


def test_top2_renormalized_gates_divide_by_the_chosen_sum():
    choice, slots = slots_of(PROBS_3x3, k=2, capacity=1, renormalize=True)
    np.testing.assert_allclose(choice.gate, [[5 / 8, 3 / 8], [6 / 9, 3 / 9], [7 / 9, 2 / 9]],
                               rtol=1e-6)
    # Renormalisation happens before drops: t0 keeps 5/8 and 3/8 although nothing was dropped
    # for it, and t2 keeps 7/9 although its second choice was dropped.
    np.testing.assert_allclose(slots.gate, [[5 / 8], [3 / 8], [7 / 9]], rtol=1e-6)


def test_top2_enough_capacity_keeps_everything():
    _, slots = slots_of(PROBS_3x3, k=2, capacity=2)
    # e0: t0, t1; e1: t0 (rank 2 of t0), t2 (rank 2 of t2); e2: t2 (rank 1), t1 (rank 2).
    np.testing.assert_array_equal(slots.token, [[0, 1], [0, 2], [2, 1]])
    np.testing.assert_allclose(slots.gate, [[0.5, 0.6], [0.3, 0.2], [0.7, 0.3]])
    assert bool(slots.kept.all())


def test_batch_priority_uses_top1_probability_not_renormalized_gate():
    # Both tokens pick expert 0 first. Raw top-1: t0 .45 < t1 .60, so t1 has priority.
    # Renormalised over the top 2 the order flips (t0 .45/.64 = .70 > t1 .60/.99 = .61):
    # the priority must follow the raw probability (V-MoE BPR).
    probs = jnp.array([[0.45, 0.19, 0.18, 0.18], [0.60, 0.39, 0.005, 0.005]])
    choice, slots = slots_of(probs, k=2, capacity=1, priority="batch_priority", renormalize=True)
    assert float(choice.gate[0, 0]) > float(choice.gate[1, 0])
    assert int(slots.token[0, 0]) == 1
    np.testing.assert_array_equal(slots.kept[:, 0], [False, True])


def test_expert_choice_takes_top_capacity_tokens_per_expert():
    slots = routing.route_expert_choice(PROBS_4x2, capacity=2)
    # Expert 0 scores: .7 .6 .2 .9 -> tokens 3, 0. Expert 1: .3 .4 .8 .1 -> tokens 2, 1.
    np.testing.assert_array_equal(slots.token, [[3, 0], [2, 1]])
    np.testing.assert_allclose(slots.gate, [[0.9, 0.7], [0.8, 0.4]])
    np.testing.assert_array_equal(slots.kept[:, 0], [True, True, True, True])
    slots = routing.route_expert_choice(PROBS_4x2, capacity=1)
    np.testing.assert_array_equal(slots.token, [[3], [2]])
    np.testing.assert_array_equal(slots.kept[:, 0], [False, False, True, True])


def test_random_second_expert_keeps_with_probability_twice_g2():
    choice = routing.route_top_k(PROBS_3x3, 2, renormalize=False)
    # Renormalised second gates: t0 .3/.8 = .375, t1 .3/.9 = .333, t2 .2/.9 = .222; kept when
    # 2 * g2 > u: with u = (.74, .67, .40): .75 > .74 yes, .667 > .67 no, .444 > .40 yes.
    out = routing.random_second_expert(choice, jnp.array([0.74, 0.67, 0.40]))
    np.testing.assert_array_equal(out.keep, [[True, True], [True, False], [True, True]])
    slots = routing.assign_slots(out, 2, 3, "rank")
    # The discarded choice (t1 -> e2) takes no slot: e2 holds t2 only.
    np.testing.assert_array_equal(slots.token[2], [2, 3])
    np.testing.assert_array_equal(slots.kept, out.keep)


def test_sigmoid_bias_chooses_on_biased_scores_but_gates_use_raw_scores():
    scores = jnp.array([[0.9, 0.8, 0.1], [0.2, 0.6, 0.5]])
    bias = jnp.array([0.0, -0.5, 0.3])
    choice = routing.route_sigmoid_bias(scores, bias, 2)
    # Biased: t0 (.9, .3, .4) -> e0, e2; t1 (.2, .1, .8) -> e2, e0.
    np.testing.assert_array_equal(choice.expert_index, [[0, 2], [2, 0]])
    np.testing.assert_allclose(choice.gate, [[0.9 / 1.0, 0.1 / 1.0], [0.5 / 0.7, 0.2 / 0.7]],
                               rtol=1e-6)


def test_sigmoid_bias_top1_gate_is_the_raw_score():
    # Normalising one gate over itself would give 1 and no router gradient.
    scores = jnp.array([[0.9, 0.8, 0.1], [0.2, 0.6, 0.5]])
    choice = routing.route_sigmoid_bias(scores, jnp.array([0.0, 0.0, 0.3]), 1)
    np.testing.assert_array_equal(choice.expert_index, [[0], [2]])
    np.testing.assert_allclose(choice.gate, [[0.9], [0.5]])
    grad = jax.grad(lambda s: routing.route_sigmoid_bias(s, jnp.zeros(3), 1).gate.sum())(scores)
    assert float(jnp.abs(grad).sum()) > 0


def test_update_score_bias_moves_towards_balance():
    bias = jnp.zeros(4)
    new = routing.update_score_bias(bias, jnp.array([0.5, 0.25, 0.25, 0.0]), 0.01)
    np.testing.assert_allclose(new, [-0.01, 0.0, 0.0, 0.01])


def test_load_balancing_loss_hand_computed():
    # Top-1 choices [0, 0, 1, 0]: f = (3/4, 1/4); P = mean probs = (.6, .4).
    # E * sum f*P = 2 * (.75*.6 + .25*.4) = 1.1.
    expert_index = jnp.array([[0], [0], [1], [0]])
    np.testing.assert_allclose(losses.load_balancing_loss(PROBS_4x2, expert_index), 1.1,
                               rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_is_one_when_uniform(k):
    num_experts, tokens = 4, 8
    probs = jnp.full((tokens, num_experts), 1 / num_experts)
    expert_index = (jnp.arange(tokens * k).reshape(tokens, k)) % num_experts  # balanced
    np.testing.assert_allclose(losses.load_balancing_loss(probs, expert_index), 1.0, rtol=1e-6)


def test_z_loss_and_entropy_hand_computed():
    logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4.
    expected = (np.log(2) ** 2 + np.log(4) ** 2) / 2
    np.testing.assert_allclose(losses.router_z_loss(logits), expected, rtol=1e-6)
    probs = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(losses.router_entropy(probs), np.log(2) / 2, rtol=1e-6)


def test_soft_weights_normalise_over_tokens_and_slots():
    logits = jax.random.normal(jax.random.key(0), (5, 3))
    dispatch, combine = routing.soft_weights(logits)
    np.testing.assert_allclose(dispatch.sum(0), np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(combine.sum(1), np.ones(5), rtol=1e-6)


@pytest.mark.parametrize(("k", "tokens", "factor", "experts", "expected"), [
    (1, 8, 1.0, 4, 2), (2, 8, 1.0, 4, 4), (1, 8, 1.25, 4, 3), (2, 6, 0.5, 4, 2), (1, 3, 0.1, 8, 1),
])
def test_capacity_formula(k, tokens, factor, experts, expected):
    # C = ceil(k * T * factor / E), at least 1.
    config = MoeConfig(num_experts=experts, top_k=k, capacity_factor=factor)
    assert config.capacity(tokens, train=True) == expected
    assert config.replace(expert_capacity=7).capacity(tokens, train=True) == 7
    assert MoeConfig(num_experts=experts, top_k=k, eval_capacity_factor=factor).capacity(
        tokens, train=False) == expected


def test_route_gives_each_token_its_share_and_entropy():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    top2 = MoeConfig(num_experts=3, top_k=2)
    tokens = routing.route(logits, top2, num_groups=1, train=False).tokens
    np.testing.assert_allclose(tokens.expert_share(), [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(tokens.entropy()[0], -np.sum(np.array([0.7, 0.2, 0.1]) * np.log(
        [0.7, 0.2, 0.1])), rtol=1e-6)
    np.testing.assert_array_equal(tokens.choice.expert_index, [[0, 1], [2, 1]])
    # sigmoid_bias: a large bias on expert 2 makes every token choose it.
    biased = top2.replace(router="sigmoid_bias", top_k=1)
    tokens = routing.route(logits, biased, num_groups=1, train=False,
                           state={"score_bias": jnp.array([0.0, 0.0, 5.0])}).tokens
    np.testing.assert_allclose(tokens.expert_share(), [[0, 0, 1], [0, 0, 1]])
    # Expert choice: tokens do not choose; their share is the routing distribution.
    chosen = routing.route(logits, top2.replace(router="expert_choice", top_k=1), num_groups=1,
                           train=False)
    assert chosen.tokens.choice is None
    np.testing.assert_allclose(chosen.tokens.expert_share(), [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
                               rtol=1e-6)


def test_route_statistics_count_only_unmasked_tokens():
    # Token 1 is padding: it takes no slot, and load and drops count the other three.
    logits = jnp.log(PROBS_4x2)
    config = MoeConfig(num_experts=2, top_k=1, expert_capacity=1)
    routed = routing.route(logits, config, num_groups=1, train=True,
                           token_mask=jnp.array([True, False, True, True]))
    np.testing.assert_array_equal(routed.tokens.choice.keep[:, 0], [True, False, True, False])
    np.testing.assert_allclose(routed.statistics["expert_load"], [1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(routed.statistics["dropped_fraction"], 1 / 3, rtol=1e-6)
    assert float(routed.num_tokens) == 3.0


def test_reductions_are_declared_once_for_every_statistic():
    assert routing.reduction("max_router_logit") == "max"
    assert routing.reduction("layer/max_router_logit") == "max"
    assert routing.reduction("train/expert_load") == "mean"
    assert routing.reduction("loss") == "mean"
    assert set(routing.STATISTICS.values()) == {"mean", "max"}
