"""A lower bound on the time a train step spends in collectives, from their bytes.

    seconds = bound_seconds(report.collectives, topology.device_ici_bytes_per_second)
    # {kind: seconds per step}, e.g. {"all-gather": 0.41, "all-to-all": 0.05}

The model, per device and per collective instruction whose result holds R bytes and whose
device groups hold N devices, follows "How to Scale Your Model" (Austin et al. 2025, Part 3
"Sharded Matrices and How to Multiply Them", the sections on AllGather, ReduceScatter, AllReduce
and "Our final communication primitive: the AllToAll"): a bandwidth-bound ring collective moves

    all-gather           R (N - 1) / N      (each device receives the N - 1 shards it lacks)
    reduce-scatter       R (N - 1)          (each sends N - 1 shards of its N R-byte input)
    all-reduce           2 R (N - 1) / N    (a reduce-scatter, then an all-gather)
    all-to-all           R N / 4            (chunks of R / N travel N / 4 hops on average on a
                                             bidirectional ring: the book's "AllGather / 4" of
                                             the N R-byte array)
    collective-permute   R                  (one peer, at least one hop)
    collective-broadcast R (N - 1) / N      (as an all-gather)

bytes through each device's links, at W bytes per second. W is the device's one-direction ICI
bandwidth over all of its chip's ports (`topology.Topology.device_ici_bytes_per_second`: half
the chip's published bidirectional figure, divided among the chip's devices); in the book's
terms, the bidirectional bandwidth of one torus axis times the number of axes. This is a lower
bound: a collective over one mesh axis that spans one torus axis gets only that axis's ports
(a half of v5e's and v6e's, a third of v4's and v5p's), a mesh without wraparound links gets
half, and each hop also costs about 1 us of latency, which the bound leaves out. It also assumes
that collectives of one kind do not share links with each other or with other kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Bytes through each device's links per result byte of a collective over groups of N devices.
RING_FACTORS = {
    "all-gather": lambda n: (n - 1) / n,
    "collective-broadcast": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: n / 4,
    "ragged-all-to-all": lambda n: n / 4,
    "collective-permute": lambda n: 1.0,
}


def link_bytes(kind: str, result_bytes: float, group_size: int) -> float:
    """Bytes that one device's links carry for a collective `kind` whose result holds
    `result_bytes` bytes per device, over groups of `group_size` devices (module docstring)."""
    if kind not in RING_FACTORS:
        raise ValueError(f"collective kind {kind!r} has no communication model; known kinds: "
                         f"{', '.join(RING_FACTORS)}.")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} of a {kind} must be at least 1.")
    return result_bytes * RING_FACTORS[kind](group_size)


def bound_seconds(collectives: Mapping[str, Mapping[str, Any]], ici_bytes_per_second: float
                  ) -> dict[str, float]:
    """Seconds per step that each kind of collective needs at least: its link bytes (summed
    over `bytes_per_step_by_group`, as `compiled_hlo.Collective` records it, as a dict) over the
    device's one-direction ICI bandwidth `ici_bytes_per_second`."""
    out = {}
    for kind, collective in collectives.items():
        by_group = collective.get("bytes_per_step_by_group") or {}
        if not by_group:
            raise ValueError(f"the {kind} record has no bytes_per_step_by_group (a report "
                             "written before group sizes were read); recompile it, or give "
                             "its group sizes with `assume_groups`.")
        moved = sum(link_bytes(kind, size, int(group)) for group, size in by_group.items())
        out[kind] = moved / ici_bytes_per_second
    return out


def assume_groups(collectives: Mapping[str, Mapping[str, Any]], groups: Mapping[str, int]
                  ) -> dict[str, dict[str, Any]]:
    """`collectives` with every kind's bytes per step put in one group of `groups[kind]`
    devices, for records that lack `bytes_per_step_by_group` (the caller states the
    assumption: e.g. all-to-all over the expert axis)."""
    return {kind: {**c, "bytes_per_step_by_group": c.get("bytes_per_step_by_group") or {
        groups[kind]: c["result_bytes_per_step"]}} for kind, c in collectives.items()}
