"""Routing alarms on hand-made metric histories (moe_jax/train/monitor.py): each alarm fires
after its patience, once, and again only after clearing; grace steps; thresholds in the
messages; the outputs (alerts.jsonl, TensorBoard) and stopping. Real training runs that provoke
the alarms are in tests/test_routing_health.py."""

from __future__ import annotations

import math

import pytest

from moe_jax.train import monitor
from moe_jax.train.config import MonitorConfig

E = 4
BALANCED = [0.25] * E
CONFIG = MonitorConfig(grace_steps=0, patience=3, max_violation=1.0, growth_window=2)


def record(step: int, share=BALANCED, dropped=0.0, logit=3.0, z=5.0, loss=2.0,
           layer: int = 1) -> dict:
    return {"step": step, "loss": loss, f"layer_{layer}/assignment_fraction": list(share),
            f"layer_{layer}/dropped_fraction": dropped, f"layer_{layer}/max_router_logit": logit,
            f"layer_{layer}/router_z_loss": z}


def fired(records, config=CONFIG) -> list[tuple]:
    return [(a.kind, a.step, a.layer, a.expert) for a in monitor.scan(records, config)]


def test_a_healthy_series_raises_nothing():
    shares = ([0.3, 0.2, 0.25, 0.25], [0.22, 0.28, 0.26, 0.24], BALANCED)
    records = [record(s, shares[s % 3], dropped=0.05, logit=3 + 0.01 * s) for s in range(1, 30)]
    assert fired(records) == []
    assert fired(records, MonitorConfig()) == []  # the defaults


def test_collapse_fires_after_patience_once_and_again_after_it_clears():
    starved = [0.4, 0.3, 0.3, 0.0]
    shares = [BALANCED, starved, starved, starved, starved, BALANCED, starved, starved, starved]
    alarms = monitor.scan([record(s + 1, sh) for s, sh in enumerate(shares)], CONFIG)
    assert [(a.kind, a.step, a.layer, a.expert) for a in alarms] == [
        ("collapse", 4, 1, 3), ("collapse", 9, 1, 3)]
    first = alarms[0]
    assert first.threshold == pytest.approx(0.1 / E) and first.value == 0.0
    message = first.message()
    for part in ("[collapse]", "step 4", "layer 1", "expert 3", "0.025", "3 consecutive logs"):
        assert part in message, message


def test_imbalance_is_maxvio_above_its_bound():
    assert monitor.max_violation(BALANCED) == pytest.approx(0.0)
    assert monitor.max_violation([0.5, 0.5, 0.0, 0.0]) == pytest.approx(1.0)
    assert monitor.max_violation([0.7, 0.1, 0.1, 0.1]) == pytest.approx(1.8)
    skewed = [0.7, 0.1, 0.1, 0.1]  # MaxVio 1.8 > 1.0, no expert below 0.025
    alarms = monitor.scan([record(s, skewed) for s in range(1, 6)], CONFIG)
    assert [(a.kind, a.step, a.expert) for a in alarms] == [("imbalance", 3, 0)]
    assert alarms[0].value == pytest.approx(1.8) and alarms[0].threshold == 1.0


def test_drops_need_patience_and_respect_the_grace_steps():
    records = [record(s, dropped=0.8) for s in range(10, 16)]
    assert fired(records) == [("drops", 12, 1, None)]
    late = MonitorConfig(grace_steps=13, patience=3)
    assert fired(records, late) == [("drops", 15, 1, None)]  # logs 13, 14, 15


def test_instability_bounds_fire_at_once_and_grace_does_not_hide_them():
    config = MonitorConfig(grace_steps=1000, max_router_logit=10, max_router_z_loss=50)
    records = [record(1), record(2, logit=12.0), record(3, logit=13.0), record(4, z=60.0)]
    alarms = monitor.scan(records, config)
    assert [(a.kind, a.step, a.metric) for a in alarms] == [
        ("instability", 2, "layer_1/max_router_logit"),
        ("instability", 4, "layer_1/router_z_loss")]


def test_fast_logit_growth_is_instability():
    # growth_window=2: step 5's 20 is more than 2x step 3's 6, and above max_router_logit / 2.
    config = MonitorConfig(grace_steps=0, growth_window=2, logit_growth=2.0,
                           max_router_logit=30)
    logits = [5.0, 5.5, 6.0, 9.0, 20.0, 21.0]
    alarms = monitor.scan([record(s + 1, logit=x) for s, x in enumerate(logits)], config)
    assert [(a.kind, a.step) for a in alarms] == [("instability", 5)]
    assert "2 x 6" in alarms[0].message()
    small = [1.0, 1.5, 3.0, 7.0]  # fast, but far below the bound: early training, not an alarm
    assert fired([record(s + 1, logit=x) for s, x in enumerate(small)], config) == []


def test_non_finite_values_fire_immediately_with_the_expert():
    records = [record(1), record(2, share=[0.25, math.nan, 0.25, 0.25]),
               record(3, loss=math.inf)]
    assert fired(records) == [("non_finite", 2, 1, 1), ("non_finite", 3, None, None)]


def test_layers_are_checked_separately():
    r = record(5, layer=1) | record(5, share=[0.5, 0.5, 0.0, 0.0], layer=3)
    assert monitor.layers(r) == [1, 3]
    alarms = monitor.alarms_at([r | {"step": s} for s in (5, 6, 7)], CONFIG)
    assert {(a.kind, a.layer, a.expert) for a in alarms} == {
        ("collapse", 3, 2), ("collapse", 3, 3)}


class FakeWriter:
    def __init__(self):
        self.alerts = []

    def alert(self, step, tag, value, text):
        self.alerts.append((step, tag, value, text))


def test_monitor_writes_alerts_and_stops_on_the_listed_alarms(tmp_path):
    writer, printed = FakeWriter(), []
    config = MonitorConfig(grace_steps=0, patience=1, stop_on=("drops",))
    watch = monitor.Monitor(config, str(tmp_path), writer, printed.append)
    assert watch.observe(1, record(1)) == []
    alarms = watch.observe(2, {k: v for k, v in record(2, dropped=0.9).items() if k != "step"})
    assert [a.kind for a in alarms] == ["drops"]
    saved = monitor.read_alerts(str(tmp_path))
    assert [(a["kind"], a["step"], a["layer"], a["value"]) for a in saved] == [
        ("drops", 2, 1, 0.9)]
    assert printed == [alarms[0].message()] and saved[0]["message"] == printed[0]
    assert writer.alerts == [(2, "alerts/drops", 0.9, printed[0])]
    with pytest.raises(monitor.RoutingAlarmError, match=r"\[drops\].*stop_on lists 'drops'.*"
                       r"step 1 in DIR.*capacity_factor"):
        watch.stop_if_asked(alarms, "the last good checkpoint is step 1 in DIR")
    monitor.Monitor(MonitorConfig(), str(tmp_path), None).stop_if_asked(alarms, "")  # not listed


def test_a_disabled_monitor_is_silent(tmp_path):
    watch = monitor.Monitor(MonitorConfig(enabled=False), str(tmp_path), None)
    assert watch.observe(1, record(1, loss=math.nan)) == []


@pytest.mark.parametrize("changes, message", [
    ({"stop_on": ("colapse",)}, "stop_on=('colapse',) lists an unknown alarm"),
    ({"patience": 0}, "patience=0 must be an integer >= 1"),
    ({"collapse_fraction": 1.5}, "collapse_fraction=1.5 must be in (0, 1)"),
    ({"logit_growth": 1.0}, "logit_growth=1.0 must be a finite number > 1"),
])
def test_monitor_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match="MonitorConfig." + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        MonitorConfig(**changes)
