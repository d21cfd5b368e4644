"""The ragged exchange of dropless expert parallelism: the offset bookkeeping on hand-made group
sizes, the receive buffer's sort by local expert, and the exact all_to_all equivalent of
ragged_all_to_all used on CPU, against the semantics jax documents for ragged_all_to_all."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from moe_jax.parallel import ragged_exchange

# Two devices, four experts (device 0 holds experts 0-1, device 1 experts 2-3). Rows sent,
# S[sender, receiver]: device 0 sends 1+2=3 rows to itself and 0+3=3 to device 1; device 1
# sends 2+0=2 to device 0 and 4+1=5 to itself.
SIZES = jnp.array([[1, 2, 0, 3],
                   [2, 0, 4, 1]], jnp.int32)


def _as_lists(p):
    return [np.asarray(a).tolist() for a in p]


def test_forward_plan_on_hand_made_group_sizes():
    forward0, _ = ragged_exchange.plan(SIZES, 0)
    forward1, _ = ragged_exchange.plan(SIZES, 1)
    # device 0: runs at 0 and 3; both land at the start of their receivers' buffers; it gets
    # 3 rows from itself and 2 from device 1.
    assert _as_lists(forward0) == [[0, 3], [3, 3], [0, 0], [3, 2]]
    # device 1: runs at 0 and 2; on device 0 after device 0's 3 rows, on itself after the 3
    # rows device 0 sends it; it gets 3 rows from device 0 and 5 from itself.
    assert _as_lists(forward1) == [[0, 2], [2, 5], [3, 3], [3, 5]]


def test_reverse_plan_returns_each_run_to_where_it_came_from():
    _, reverse0 = ragged_exchange.plan(SIZES, 0)
    _, reverse1 = ragged_exchange.plan(SIZES, 1)
    # device 0 holds [its 3 rows | device 1's 2 rows]: sends 3 rows from 0 back to its own
    # offset 0, 2 rows from 3 to device 1's offset 0; receives its 3 + 3 rows.
    assert _as_lists(reverse0) == [[0, 3], [3, 2], [0, 0], [3, 3]]
    # device 1 holds [device 0's 3 rows | its 5 rows]: 3 rows go to device 0's offset 3 (where
    # they were sent from), 5 rows to its own offset 2.
    assert _as_lists(reverse1) == [[0, 3], [3, 5], [3, 2], [2, 5]]


def test_plans_agree_between_senders_and_receivers():
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(rng.integers(0, 5, size=(4, 8)), jnp.int32)
    plans = [ragged_exchange.plan(sizes, me) for me in range(4)]
    for me in range(4):
        for peer in range(4):
            for forward_or_reverse in (0, 1):
                sender = plans[me][forward_or_reverse]
                receiver = plans[peer][forward_or_reverse]
                assert int(sender.send_sizes[peer]) == int(receiver.recv_sizes[me])


def test_local_expert_order_sorts_the_receive_buffer():
    # From device 0: 1 row for local expert 0, 2 for expert 1; from device 1: 2 for expert 0.
    order, sizes = ragged_exchange.local_expert_order(jnp.array([[1, 2], [2, 0]]), 7)
    assert np.asarray(order).tolist() == [0, 3, 4, 1, 2, 5, 6]  # rows 5, 6 unused, last
    assert np.asarray(sizes).tolist() == [3, 2]


def _documented_ragged_all_to_all(operands, outputs, plans):
    """numpy, from the pseudo-code of jax.lax.ragged_all_to_all's docstring."""
    results = [np.array(o) for o in outputs]
    n = len(operands)
    for sender in range(n):
        p = plans[sender]
        for dst in range(n):
            start, size = int(p.input_offsets[dst]), int(p.send_sizes[dst])
            at = int(p.output_offsets[dst])
            results[dst][at:at + size] = np.asarray(operands[sender])[start:start + size]
    return results


def test_cpu_all_to_all_equivalent_matches_the_documented_semantics():
    n, rows, d = 4, 6, 3
    rng = np.random.default_rng(1)
    sizes = jnp.asarray(rng.multinomial(rows - 1, np.ones(2 * n) / (2 * n), size=n), jnp.int32)
    operands = jnp.asarray(rng.normal(size=(n, rows, d)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:n]), ("expert",))

    # check_vma=False, as `expert_parallel.MoeSharding` runs its shard_map
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(PartitionSpec("expert"),),
                       out_specs=PartitionSpec("expert"), check_vma=False)
    def exchange(operand):
        me = jax.lax.axis_index("expert")
        forward, _ = ragged_exchange.plan(sizes, me)
        output = jnp.full((n * rows, d), -1.0)
        return ragged_exchange.ragged_all_to_all(operand[0], output, forward, "expert")[None]

    got = jax.jit(exchange)(operands)
    plans = [ragged_exchange.plan(sizes, me)[0] for me in range(n)]
    expected = _documented_ragged_all_to_all(operands, np.full((n, n * rows, d), -1.0), plans)
    np.testing.assert_array_equal(got, np.stack(expected))


def test_exchange_round_trip_with_identity_experts_returns_the_routed_rows():
    n, rows, d = 4, 5, 2
    rng = np.random.default_rng(2)
    sizes = jnp.asarray(rng.multinomial(rows - 2, np.ones(n) / n, size=n), jnp.int32)  # E = n
    x = jnp.asarray(rng.normal(size=(n, rows, d)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:n]), ("expert",))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(PartitionSpec("expert"),) * 2,
                       out_specs=PartitionSpec("expert"), check_vma=False)
    def round_trip(x, sizes):
        # each device's one expert multiplies by (its index + 1)
        scale = jax.lax.axis_index("expert") + 1.0
        return ragged_exchange.exchange_experts(x[0], sizes[0], lambda r, s: r * scale,
                                                "expert")[None]

    out = np.asarray(jax.jit(round_trip)(x, sizes))
    for device in range(n):
        expert = np.repeat(np.arange(n), np.asarray(sizes[device]))  # each routed row's expert
        routed = len(expert)
        np.testing.assert_allclose(out[device, :routed],
                                   np.asarray(x[device, :routed]) * (expert[:, None] + 1))
        assert not np.any(out[device, routed:])  # rows past the groups: zeros
