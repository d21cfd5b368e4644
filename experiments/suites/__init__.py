"""Paper-reproduction suites: members x seeds to train, claims to check, figures to draw.

    from experiments import suites
    suite = suites.get("capacity")
    runs = suite.expand("tiny", seeds=3)        # [RunSpec]: config spec + overrides + seed

One module per suite (each defines `SUITE`), built from the suite library (`experiments.library`:
the types, the verdict rule, the results file, the figure helpers); the analyses of trained runs
that some suites run are in `experiments.analyses`.
"""

from experiments.library.base import Suite
from experiments.suites import (
    balance,
    capacity,
    granularity,
    routers,
    routing_analysis,
    routing_drift,
    stability,
    switch_scaling,
    upcycling,
)

SUITES: dict[str, Suite] = {module.SUITE.name: module.SUITE for module in (
    switch_scaling, capacity, balance, stability, routers, granularity, routing_analysis,
    routing_drift, upcycling)}


def get(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"suite {name!r} is unknown; use one of {sorted(SUITES)}.")
    return SUITES[name]
