"""Dropless expert parallelism: exchange each device's routed rows with a ragged all-to-all.

Shape letters: n devices on the expert axis, E experts (E / n local to each device), M routed
rows of one device (sorted by expert), d model width.

Each device sorts its M routed rows by expert, so the rows for device j's experts are one
contiguous run. With the [n, E] table of every device's rows per expert (an all-gather of the
group sizes), each device computes the four arrays of `jax.lax.ragged_all_to_all` (`plan`):
where its runs start (input offsets), their sizes (send sizes), where they land on their
receivers (output offsets: after the runs of lower-numbered senders), and what it receives
from each sender (receive sizes). The receiver holds the senders' runs one after another, each
sorted by local expert; `local_expert_order` sorts them by local expert for the grouped matmul
and back. The results return by the reverse exchange (`Plan.reverse`) to the rows they came
from. The receive buffer has the worst case's n * M rows (every device's rows to one device).

XLA:CPU does not implement `ragged_all_to_all`; there `ragged_all_to_all` uses an exact
equivalent from `all_to_all` on fixed [n, M, d] buffers (n times the bytes), chosen per
platform when the program is lowered.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.dispatch import GroupedStage

Array = jax.Array


class Plan(NamedTuple):
    """The offsets and sizes of one `jax.lax.ragged_all_to_all`, each [n] int32, indexed by
    peer device: rows operand[input_offsets[j]:+send_sizes[j]] go to device j, where they are
    written at output_offsets[j]; recv_sizes[i] rows come from device i."""

    input_offsets: Array
    send_sizes: Array
    output_offsets: Array
    recv_sizes: Array


def _exclusive_cumsum(a: Array, axis: int = -1) -> Array:
    return jnp.cumsum(a, axis=axis) - a


def plan(all_group_sizes: Array, me: Array) -> tuple[Plan, Plan]:
    """(forward, reverse) plans of device `me` from every device's rows per expert.

    all_group_sizes: [n, E] int32, row i = device i's group sizes (its rows sorted by expert);
    device j holds experts [j * E/n, (j + 1) * E/n). With S[i, j] = rows device i sends to j:
      forward: input_offsets[j] = sum_{j' < j} S[me, j'], send_sizes[j] = S[me, j],
               output_offsets[j] = sum_{i < me} S[i, j], recv_sizes[i] = S[i, me];
      reverse: the results go back, from where they were received to where they were sent
               from: input_offsets[i] = sum_{i' < i} S[i', me], send_sizes[i] = S[i, me],
               output_offsets[i] = sum_{j < me} S[i, j], recv_sizes[j] = S[me, j].
    """
    n = all_group_sizes.shape[0]
    sends = all_group_sizes.reshape(n, n, -1).sum(-1).astype(jnp.int32)  # S [sender, receiver]
    before_sender = _exclusive_cumsum(sends, axis=0)  # [i, j]: rows for j from senders < i
    before_receiver = _exclusive_cumsum(sends, axis=1)  # [i, j]: rows of i for receivers < j
    forward = Plan(input_offsets=before_receiver[me], send_sizes=sends[me],
                   output_offsets=before_sender[me], recv_sizes=sends[:, me])
    reverse = Plan(input_offsets=before_sender[:, me], send_sizes=sends[:, me],
                   output_offsets=before_receiver[:, me], recv_sizes=sends[me])
    return forward, reverse


def local_expert_order(received_group_sizes: Array, num_rows: int) -> tuple[Array, Array]:
    """(order, group_sizes): rows[order] sorts a receive buffer by local expert.

    received_group_sizes: [n, E/n], row i = the rows per local expert that device i sent; the
    buffer holds device 0's runs for local experts 0, 1, ..., then device 1's, ...; rows past
    them (the buffer's unused worst-case rows) sort last. group_sizes [E/n] = its column sums.
    """
    local = received_group_sizes.shape[1]
    ends = jnp.cumsum(received_group_sizes.reshape(-1))  # run ends in (sender, expert) order
    run = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
    expert = jnp.where(run < ends.shape[0], run % local, local)
    return jnp.argsort(expert, stable=True), received_group_sizes.sum(0).astype(jnp.int32)


def _dense_ragged_all_to_all(operand: Array, output: Array, p: Plan, axis_name: str) -> Array:
    """`jax.lax.ragged_all_to_all`'s result from `all_to_all` of [n, M, d] buffers: chunk j
    holds the rows for device j, zero-padded to M."""
    rows = jnp.arange(operand.shape[0])
    take = p.input_offsets[:, None] + rows
    take = jnp.where(rows < p.send_sizes[:, None], take, operand.shape[0])  # [n, M]
    chunks = operand.at[take].get(mode="fill", fill_value=0)  # [n, M, d]
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0)  # [n, M, d] by sender
    at = jax.lax.all_to_all(p.output_offsets, axis_name, 0, 0, tiled=True)  # senders' offsets
    put = jnp.where(rows < p.recv_sizes[:, None], at[:, None] + rows, output.shape[0])
    return output.at[put].set(received, mode="drop")


def ragged_all_to_all(operand: Array, output: Array, p: Plan, axis_name: str) -> Array:
    """`jax.lax.ragged_all_to_all(operand, output, *p, axis_name=...)`, or its exact `all_to_all`
    equivalent on XLA:CPU (chosen when the program is lowered for its platform)."""
    def ragged(operand, output, p):
        return jax.lax.ragged_all_to_all(operand, output, *p, axis_name=axis_name)

    def dense(operand, output, p):
        return _dense_ragged_all_to_all(operand, output, p, axis_name)

    return jax.lax.platform_dependent(operand, output, p, cpu=dense, default=ragged)


def exchange_experts(rows: Array, group_sizes: Array, stage: GroupedStage,
                     axis_name: str) -> Array:
    """Rows sorted by expert [M, d] with group_sizes [E] -> the experts' outputs [M, d], the
    experts spread over `axis_name` (E/n on each device; `stage` runs this device's).

    all-gather the group sizes, send each run to its experts' device, sort the received rows
    by local expert, run `stage`, unsort, send the results back. Rows past sum(group_sizes)
    come back as zeros.
    """
    n = jax.lax.axis_size(axis_name)
    local = group_sizes.shape[0] // n
    me = jax.lax.axis_index(axis_name)
    all_sizes = jax.lax.all_gather(group_sizes.astype(jnp.int32), axis_name)  # [n, E]
    forward, reverse = plan(all_sizes, me)
    buffer = jnp.zeros((n * rows.shape[0], rows.shape[1]), rows.dtype)
    received = ragged_all_to_all(rows, buffer, forward, axis_name)
    received_sizes = jax.lax.dynamic_slice_in_dim(all_sizes, me * local, local, axis=1)
    order, local_sizes = local_expert_order(received_sizes, buffer.shape[0])
    out = jnp.zeros_like(received).at[order].set(stage(received[order], local_sizes))
    return ragged_all_to_all(out, jnp.zeros_like(rows), reverse, axis_name)
