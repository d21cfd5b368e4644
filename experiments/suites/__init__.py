"""Paper-reproduction suites: members x seeds to train, claims to check, figures to draw.

    from experiments import suites
    suite = suites.get("capacity")
    runs = suite.expand("tiny", seeds=3)        # [RunSpec]: config spec + overrides + seed

One module per suite (each defines `SUITE`); `base` defines the types, `stats` and `checks` the
verdict rule, `results` the results file, `plots` the figure helpers and `routing_stats` the
routing analysis of trained checkpoints.
"""

from experiments.suites import (
    balance,
    capacity,
    granularity,
    routers,
    routing_analysis,
    routing_drift,
    stability,
    switch_scaling,
)
from experiments.suites.base import Suite

SUITES: dict[str, Suite] = {module.SUITE.name: module.SUITE for module in (
    switch_scaling, capacity, balance, stability, routers, granularity, routing_analysis,
    routing_drift)}


def get(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"suite {name!r} is unknown; use one of {sorted(SUITES)}.")
    return SUITES[name]
