"""experiments/: the suite runner (a real 2-member micro suite, resumed), the verdict rule on
hand-made numbers, the report from a committed fixture, the routing statistics on hand-made
arrays, and the suites' configs (they build, stay FLOP-matched, and reproduce configs/)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

from experiments import report as report_cli
from experiments import run, suites
from experiments.analyses import report, routing_stats
from experiments.library import checks, stats
from experiments.library.base import (
    Member,
    RunSpec,
    Suite,
    config_diff,
    format_value,
    rematched,
)
from experiments.library.results import Results
from experiments.runner import run_dir, steps, sweep
from moe_jax import schema
from moe_jax.analysis import flops
from moe_jax.train.metrics import write_json

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures",
                       "experiments_switch_scaling_tiny.json")
MICRO_MODEL = {  # the shapes of tests/test_main.py, so compilations are shared via the cache
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 64,
    "model.max_seq_len": 32, "moe.d_ff": 64, "data.name": "embedded_tiny",
    "data.eval_batches": 2, "train.batch_size": 4,
}


# --- the runner on a real micro suite ----------------------------------------------------------

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A 2-member suite (dense and a 4-expert Switch), 3 steps each, run once by the runner."""
    from moe_jax.data import corpus

    tmp = tmp_path_factory.mktemp("micro")
    data_dir = str(tmp / "tfds")
    corpus.prepare_embedded_corpus(data_dir, "tiny")
    model = {**MICRO_MODEL, "data.data_dir": data_dir}
    suite = Suite(
        name="micro", title="micro", references=(), claims=(),
        members=lambda scale: (Member("dense", "dense.py:tiny", model, {"experts": 1}),
                               Member("switch", "switch.py:e4", model, {"experts": 4})),
        train={"tiny": {"train.num_train_steps": 3, "train.warmup_steps": 1,
                        "train.log_every": 1}})
    paths = {"workdir_root": str(tmp / "runs"), "results_dir": str(tmp / "results")}
    lines: list[str] = []
    path = sweep.run_suite(suite, "tiny", seeds=1, log=lines.append, **paths)
    return suite, paths, path, lines


def test_runner_writes_the_results_file(micro):
    _, _, path, lines = micro
    with open(path) as f:
        data = json.load(f)
    assert [(r["member"], r["seed"], r["status"]) for r in data["runs"]] == [
        ("dense", 0, "finished"), ("switch", 0, "finished")]
    for r in data["runs"]:
        assert r["summary"]["steps"] == 3 and math.isfinite(r["summary"]["eval_loss"])
        assert [h["step"] for h in r["history"] if "train/loss" in h] == [1, 2, 3]
        assert r["command"].startswith("python -m moe_jax.main --config=configs/")
    with open(os.path.splitext(path)[0] + ".csv") as f:
        rows = f.read().strip().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[2:5] == ["dense", "0", "finished"]
    assert any(line.startswith("[2/2] switch_s0: finished") for line in lines)


def test_rerun_skips_finished_members(micro, monkeypatch):
    suite, paths, _, _ = micro
    runs_dir = os.path.join(paths["workdir_root"], "tiny")
    summaries = [os.path.join(runs_dir, d, "summary.json") for d in ("dense_s0", "switch_s0")]
    before = [os.stat(p).st_mtime_ns for p in summaries]
    launched = []
    monkeypatch.setattr(run_dir, "launch", lambda spec, *a, **k: launched.append(spec))
    lines: list[str] = []
    sweep.run_suite(suite, "tiny", seeds=1, log=lines.append, **paths)
    assert launched == []
    assert [os.stat(p).st_mtime_ns for p in summaries] == before
    assert sum(line.startswith("skip ") for line in lines) == 2
    # A changed request for the same directory is refused instead of silently mixed.
    with pytest.raises(run_dir.WorkdirConflictError, match=r"train\.num_train_steps"):
        sweep.run_suite(suite, "tiny", seeds=1, extra={"train.num_train_steps": 4},
                      log=lines.append, **paths)
    assert launched == []


def _fake_training(losses: dict[str, float], launched: list[str], stop_after: int | None = None):
    """A stand-in for `run_dir.launch` that writes what a finished training leaves in its workdir
    (request.json, summary.json, metrics.jsonl) with a made-up loss, and raises
    KeyboardInterrupt (a killed sweep) when asked to start run number `stop_after`."""
    def launch(spec, workdir, **_):
        if stop_after is not None and len(launched) == stop_after:
            raise KeyboardInterrupt
        launched.append(spec.workdir_name)
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, run_dir.REQUEST_FILE), run_dir.request(spec))
        write_json(os.path.join(workdir, run_dir.SUMMARY_FILE),
                   {"steps": spec.num_train_steps, "eval_loss": losses[spec.workdir_name]})
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "train/loss": 3.0}) + "\n")
        return "finished"
    return launch


def _entries(path):
    with open(path) as f:
        data = json.load(f)
    return {(r["member"], r["seed"]): r for r in data["runs"]}, data


def test_interrupted_suite_resumes_from_the_committed_results_alone(micro, tmp_path,
                                                                  monkeypatch):
    suite, _, _, _ = micro
    paths = {"workdir_root": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")}
    losses = {"dense_s0": 2.5, "switch_s0": 2.4, "dense_s1": 2.6, "switch_s1": 2.3}
    launched: list[str] = []
    monkeypatch.setattr(run_dir, "launch", _fake_training(losses, launched, stop_after=3))
    with pytest.raises(KeyboardInterrupt):
        sweep.run_suite(suite, "tiny", seeds=2, log=lambda _: None, **paths)
    path = steps.results_path("micro", "tiny", paths["results_dir"])
    entries, _ = _entries(path)
    assert launched == ["dense_s0", "dense_s1", "switch_s0"]  # each recorded as it finished
    assert [entries[k]["status"] for k in sorted(entries)] == [
        "finished", "finished", "finished", "missing"]
    # A fresh clone has the results file but no run directories.
    shutil.rmtree(paths["workdir_root"])
    launched.clear()
    monkeypatch.setattr(run_dir, "launch", _fake_training(losses, launched))
    lines: list[str] = []
    sweep.run_suite(suite, "tiny", seeds=2, log=lines.append, **paths)
    assert launched == ["switch_s1"]
    assert sum(line.startswith("skip ") for line in lines) == 3
    entries, _ = _entries(path)
    assert {k: r["summary"]["eval_loss"] for k, r in entries.items()} == {
        ("dense", 0): 2.5, ("dense", 1): 2.6, ("switch", 0): 2.4, ("switch", 1): 2.3}
    report_text = report.build(suite, Results.load(path), str(tmp_path), figures=False)
    assert "Partial suite" not in report_text


def test_a_run_recorded_without_its_analysis_is_analysed_on_restart(micro, tmp_path,
                                                                   monkeypatch):
    suite, _, _, _ = micro
    paths = {"workdir_root": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")}
    launched: list[str] = []
    monkeypatch.setattr(run_dir, "launch", _fake_training({"dense_s0": 2.5, "switch_s0": 2.4},
                                                      launched))
    analysed: list[str] = []

    def analysis(module, workdir, **_):  # fails the first time, as a crashed analysis would
        analysed.append(os.path.basename(workdir))
        if len(analysed) == 1:
            return False
        write_json(os.path.join(workdir, run_dir.ANALYSIS_FILE), {"by": module})
        return True

    monkeypatch.setattr(run_dir, "run_analysis", analysis)
    analysed_suite = dataclasses.replace(suite, analysis="some.analysis")
    sweep.run_suite(analysed_suite, "tiny", seeds=1, log=lambda _: None, **paths)
    path = steps.results_path("micro", "tiny", paths["results_dir"])
    entries, _ = _entries(path)
    assert entries[("dense", 0)]["analysis"] is None
    assert entries[("switch", 0)]["analysis"] == {"by": "some.analysis"}
    sweep.run_suite(analysed_suite, "tiny", seeds=1, log=lambda _: None, **paths)
    entries, _ = _entries(path)
    assert launched == ["dense_s0", "switch_s0"]  # analysed from its directory, not retrained
    assert analysed == ["dense_s0", "switch_s0", "dense_s0"]
    assert entries[("dense", 0)]["analysis"] == {"by": "some.analysis"}


def test_rerunning_one_member_never_erases_other_results(micro, tmp_path, monkeypatch):
    suite, _, _, _ = micro
    results_dir = str(tmp_path / "results")
    losses = {"dense_s0": 2.5, "switch_s0": 2.4, "dense_s1": 2.6, "switch_s1": 2.3}
    launched: list[str] = []
    monkeypatch.setattr(run_dir, "launch", _fake_training(losses, launched))
    sweep.run_suite(suite, "tiny", seeds=2, log=lambda _: None, results_dir=results_dir,
                  workdir_root=str(tmp_path / "runs"))
    path = steps.results_path("micro", "tiny", results_dir)
    before, _ = _entries(path)
    # Checking one member in a fresh directory: skipped, the file unchanged ...
    launched.clear()
    lines: list[str] = []
    sweep.run_suite(suite, "tiny", seeds=1, members=["switch"], log=lines.append,
                  results_dir=results_dir, workdir_root=str(tmp_path / "rerun"))
    assert launched == [] and any("--replace" in line for line in lines)
    assert _entries(path)[0] == before
    # ... and with --replace only that run's entry changes.
    losses["switch_s0"] = 2.2
    sweep.run_suite(suite, "tiny", seeds=1, members=["switch"], replace=True,
                  log=lambda _: None, results_dir=results_dir,
                  workdir_root=str(tmp_path / "rerun"))
    after, data = _entries(path)
    assert launched == ["switch_s0"] and after[("switch", 0)]["summary"]["eval_loss"] == 2.2
    assert {k: v for k, v in after.items() if k != ("switch", 0)} == {
        k: v for k, v in before.items() if k != ("switch", 0)}
    # Runs of other settings are kept beside, under other_runs, never dropped.
    sweep.run_suite(suite, "tiny", seeds=1, members=["dense"], log=lambda _: None,
                  extra={"train.num_train_steps": 4}, results_dir=results_dir,
                  workdir_root=str(tmp_path / "other"))
    entries, data = _entries(path)
    assert len(data["other_runs"]) == 4 and entries[("dense", 0)]["overrides"][
        "train.num_train_steps"] == 4
    assert data["statistics"] == stats.SEED_PAIRED


def test_routing_statistics_of_a_trained_micro_run(micro):
    _, paths, _, _ = micro
    analysis = routing_stats.route_batches(os.path.join(paths["workdir_root"], "tiny",
                                                        "switch_s0"))
    assert analysis["num_experts"] == 4 and analysis["layers"] == [1]
    layer = analysis["per_layer"]["1"]
    assert np.asarray(layer["domain_share"]).shape == (3, 4)
    shares = np.asarray(layer["class_share"])[np.asarray(layer["class_tokens"]) > 0]
    np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-6)
    assert 0.0 <= layer["repeat_first"] <= 1.0 and layer["pairs"] > 0
    assert 0.0 < layer["entropy"] <= math.log(4) + 1e-6


@pytest.mark.parametrize(("returncode", "tail", "summary", "expected"), [
    (1, "moe_jax.main: NonFiniteLossError: training loss is nan at step 7; stopping.", None,
     ("diverged", 7)),
    (0, "", {"steps": 10, "eval_loss": 2.0}, ("finished", None)),
    (0, "", {"steps": 10, "eval_loss": float("nan")}, ("diverged", 10)),
    (0, "", {"steps": 5, "eval_loss": 2.0}, ("failed", None)),
    (1, "Traceback ...\nValueError: config.moe.router='x'", None, ("failed", None)),
])
def test_classify_run_outcomes(returncode, tail, summary, expected):
    assert run_dir.classify(returncode, tail, summary, steps=10) == expected


# --- the verdict rule on hand-made numbers -----------------------------------------------------

def test_verdict_rule():
    assert stats.verdict(0.10, 0.01, "positive") == stats.AGREES
    assert stats.verdict(-0.10, 0.01, "positive") == stats.DISAGREES
    assert stats.verdict(-0.10, 0.01, "negative") == stats.AGREES
    assert stats.verdict(0.015, 0.01, "positive") == stats.INCONCLUSIVE  # within 2 SE
    assert stats.verdict(0.021, 0.01, "positive") == stats.AGREES
    assert stats.verdict(0.1, float("nan"), "positive") == stats.INCONCLUSIVE  # < 2 seeds
    assert stats.verdict(0.1, 0.0, "positive") == stats.AGREES  # identical seeds
    with pytest.raises(ValueError, match="expect"):
        stats.verdict(1.0, 0.1, "lower")


def test_estimates_and_standard_errors():
    mean, se = stats.mean_se([1.0, 2.0, 3.0])  # SD 1, SE 1/sqrt(3)
    assert mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))
    b, se = stats.slope([0, 1, 2, 3], [1.0, 0.5, 0.0, -0.5])
    assert b == pytest.approx(-0.5) and se == pytest.approx(0.0, abs=1e-12)
    b, se = stats.slope([0, 1, 2], [0.0, 1.0, 0.0])  # no trend: slope 0, SE from residuals
    assert b == pytest.approx(0.0) and se > 0
    rate, se = stats.rate_difference(0, 3, 0, 3)
    assert rate == 0.0 and 0 < se < 1
    assert stats.mean_se([2.0])[1] != stats.mean_se([2.0])[1]  # NaN with one seed


def _run(member, seed, loss, steps=(), ce=(), status="finished", **tags):
    history = [{"step": s, "train/cross_entropy": c, "train/tokens_per_second": 1000.0}
               for s, c in zip(steps, ce, strict=True)]
    return {"member": member, "seed": seed, "status": status, "tags": tags,
            "summary": {"eval_loss": loss, "steps": 100, "train_tokens": 1000},
            "history": history}


def test_checks_on_hand_made_results():
    results = Results({"suite": "x", "scale": "tiny", "runs": [
        _run("a", 0, 1.0, e=1), _run("a", 1, 1.1, e=1), _run("a", 2, 0.9, e=1),
        _run("b", 0, 2.0, e=4), _run("b", 1, 2.1, e=4), _run("b", 2, 1.9, e=4),
        _run("c", 0, 0.0, status="diverged"), _run("c", 1, 0.0, status="diverged"),
    ]})
    assert checks.lower(results, "a", "b").verdict == stats.AGREES
    assert checks.lower(results, "b", "a").verdict == stats.DISAGREES
    assert checks.trend(results, ("a", "b"), "e").verdict == stats.DISAGREES  # loss rises
    out = checks.rate_lower(results, "a", "c")
    assert out.measured.startswith("0/3 vs 2/2")
    # Groups pair by position and seed: (a, b) twice gives 6 differences of -1 +- noise.
    assert "6 seed-paired" in checks.lower(results, ["a", "a"], ["b", "b"]).measured
    with pytest.raises(ValueError, match="cannot pair"):
        checks.lower(results, ["a", "b"], ["a", "b", "c"])


def test_speedup_of_hand_made_curves():
    steps = np.arange(5, 101, 5)
    fast = _run("fast", 0, 1.0, steps, 3.0 - steps / 50)  # reaches 1.0 at step 100
    slow = _run("slow", 0, 2.0, steps, 3.0 - steps / 100)  # reaches 2.0 at step 100
    # The loss both reach is 2.0: the slow run needs 100 steps, the fast one 50 (the centred
    # smoothing leaves straight lines unchanged).
    assert checks.pair_speedup(fast, slow) == pytest.approx(2.0)
    assert checks.pair_speedup(slow, fast) == pytest.approx(0.5)
    assert checks.first_reach(np.array([0.0, 1.0, 2.0]), np.array([3.0, 2.0, 1.0]), 1.5) == 1.5


# --- the report from the committed fixture -----------------------------------------------------

def test_report_builds_tables_figures_and_verdicts(tmp_path):
    results = Results.load(FIXTURE)
    suite = suites.get("switch_scaling")
    markdown = report.build(suite, results, str(tmp_path))
    assert "| switch_e64 | experts=64, flops_x=1 | 3/0/0/0 |" in markdown
    assert "| switch_e2 | experts=2, flops_x=1 | 2/1/0/0 |" in markdown  # one diverged
    outcomes = report.claims_table(suite, results)[1]
    assert set(outcomes) == {c.id for c in suite.claims}
    # The fixture's synthetic numbers: Switch beats the 1x dense model, loses to the 4x one.
    assert outcomes["sparse_beats_dense_per_step"].verdict == stats.AGREES
    assert outcomes["sparse_beats_bigger_dense_per_step"].verdict == stats.DISAGREES
    assert "Paper scale (not run" in markdown and "| dense_4x " in markdown
    for figure in suite.figures:
        path = tmp_path / f"tiny_{figure.name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{figure.name}](tiny_{figure.name}.png)" in markdown


def test_reproduction_table_keeps_the_hand_written_text(tmp_path):
    root = tmp_path / "results"
    (root / "switch_scaling").mkdir(parents=True)
    shutil.copy(FIXTURE, root / "switch_scaling" / "tiny.json")
    path = tmp_path / "REPRODUCTION.md"
    path.write_text(f"# intro\n\n{report.BEGIN_MARK}\nstale\n{report.END_MARK}\n\n## why\n")
    for _ in range(2):  # rewriting is idempotent
        report.write_reproduction(str(path), str(root))
    text = path.read_text()
    assert text.startswith("# intro\n") and text.endswith("## why\n") and "stale" not in text
    assert text.count(report.BEGIN_MARK) == 1
    suite = suites.get("switch_scaling")
    assert all(f"**{claim.id}**" in text for claim in suite.claims)
    assert "--suite=switch_scaling --scale=tiny --seeds=3" in text
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.write_reproduction(str(path), str(root))
    assert path.read_text() == "no markers\n"  # nothing lost


def test_report_cli_refuses_a_missing_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"experiments\.run"):
        report_cli.main(["--suite=capacity", f"--results_dir={tmp_path}"])


def test_run_cli_refuses_a_gs_workdir_root(tmp_path):
    with pytest.raises(SystemExit, match=r"--workdir_root=gs://bucket/runs: .*file system.*"
                       r"moe_jax\.main --workdir=gs://"):
        run.main(["--suite=capacity", "--workdir_root=gs://bucket/runs",
                  f"--results_dir={tmp_path}", "--dry_run"])
    assert not os.listdir(tmp_path) and not os.path.exists("gs:")


# --- routing statistics on hand-made arrays ----------------------------------------------------

def test_byte_classes_and_chance_levels():
    ids = np.array([0, 1, ord("a") + 3, ord("Z") + 3, ord("7") + 3, ord(" ") + 3, ord("\n") + 3,
                    ord("(") + 3, 0xC3 + 3, 0x07 + 3])
    names = [routing_stats.BYTE_CLASSES[c] for c in routing_stats.byte_class(ids)]
    assert names == ["special", "special", "letter", "letter", "digit", "space", "space",
                     "punct", "non-ascii", "control"]
    assert routing_stats.chance_repeat_any(8, 2) == pytest.approx(1 - 15 / 28)  # Mixtral's ~46%
    assert routing_stats.chance_repeat_any(8, 1) == pytest.approx(1 / 8)


def test_repeat_rates_count_pairs_within_documents():
    # One row, two documents (segments 1, 2) and padding; top-2 choices per token.
    experts = np.array([[[0, 1], [0, 2], [3, 1], [3, 0], [2, 1], [2, 1]]])
    segments = np.array([[1, 1, 1, 2, 2, 0]])
    out = routing_stats.repeat_rates(experts, segments)
    # Pairs (0,1), (1,2) in document 1 and (3,4) in document 2; (2,3) crosses documents and
    # (4,5) touches padding. Only (0,1) repeats: same first choice 0, and {0,1} & {0,2} = {0};
    # {0,2} & {3,1} and {3,0} & {2,1} are empty.
    assert out["pairs"] == 3
    assert out["repeat_first"] == pytest.approx(1 / 3)
    assert out["repeat_any"] == pytest.approx(1 / 3)


def test_shares_mutual_information_and_domain_null():
    experts = np.array([[0], [0], [1], [1]])
    labels = np.array([0, 0, 1, 1])
    shares, tokens = routing_stats.shares_by_label(experts, labels, 2, 2)
    np.testing.assert_allclose(shares, [[1, 0], [0, 1]])
    np.testing.assert_allclose(tokens, [2, 2])
    assert routing_stats.mutual_information_bits(labels, experts[:, 0], 2, 2) == pytest.approx(1)
    assert routing_stats.mutual_information_bits(labels, np.array([0, 1, 0, 1]), 2, 2) == \
        pytest.approx(0.0)
    units = np.array([[5.0, 0.0]] * 10 + [[0.0, 5.0]] * 10)
    domains = np.array([0] * 10 + [1] * 10)
    null = routing_stats.domain_tv_with_null(units, domains, 2, permutations=50)
    assert null["domain_tv"] == pytest.approx(0.5) and null["domain_tv_z"] > 3


# --- the suites ------------------------------------------------------------------------------

def test_every_suite_builds_valid_configs_at_every_scale():
    for suite in suites.SUITES.values():
        for scale in ("tiny", "small", "paper"):
            members = suite.member_list(scale)
            assert members, (suite.name, scale)
            for member in members:  # (a member that starts from another's run gets its path)
                schema.parse_config(RunSpec(suite.name, scale, member, 0,
                                            member.overrides).build_config())
        for claim in suite.claims:
            assert claim.source and claim.paper_value and claim.statement


def test_the_cpu_scale_trains_the_tiny_models_longer_with_checkpoints():
    suite = suites.get("switch_scaling")
    runs = suite.expand("cpu", seeds=3)
    assert [r.workdir_name for r in runs[::3]] == [
        "dense_s0", "switch_e4_s0", "switch_e16_s0", "switch_e64_s0", "dense_4x_s0"]
    tiny = {r.workdir_name: r.build_config() for r in suite.expand("tiny", seeds=1)}
    for spec in runs[::3]:
        config = spec.build_config()
        assert config.model == tiny[spec.workdir_name].model  # the same tiny models
        assert config.train.num_train_steps == 6 * 100 and config.train.checkpoint_every > 0
    with pytest.raises(ValueError, match=r"sets no train\.num_train_steps"):
        suites.get("capacity").expand("cpu", seeds=1)


def test_rematched_reproduces_family_configs_and_matches_flops():
    # Re-solving a family member's recipe on its own baseline changes nothing ...
    assert rematched("x", "switch.py:e16").overrides == {}
    assert rematched("x", "fine_grained.py:e62k6s2").overrides == {}
    # ... so the granularity suite's small/paper members follow configs/fine_grained.py.
    e2 = rematched("e2", "switch.py:e4", num_experts=2)
    assert set(e2.overrides) == {"moe.num_experts", "moe.d_ff"}
    config = RunSpec("s", "tiny", e2, 0, e2.overrides).build_config()
    dense = flops.count(schema.load_config("dense.py:tiny")).useful_forward_flops_per_token
    assert flops.count(config).useful_forward_flops_per_token == pytest.approx(dense, rel=0.02)


def test_switch_scaling_bigger_dense_models_have_2x_and_4x_flops():
    members = {m.name: m for m in suites.get("switch_scaling").member_list("tiny")}

    def train_flops(name):
        m = members[name]
        return flops.count(RunSpec("s", "tiny", m, 0, m.overrides)
                           .build_config()).training_flops_per_token

    assert train_flops("dense_2x") / train_flops("dense") == pytest.approx(2.0, rel=0.1)
    assert train_flops("dense_4x") / train_flops("dense") == pytest.approx(4.0, rel=0.1)


def test_expand_orders_overrides_and_names_bad_members():
    suite = suites.get("capacity")
    runs = suite.expand("tiny", seeds=2, members=["t2_cf0.5"])
    assert [r.workdir_name for r in runs] == ["t2_cf0.5_s0", "t2_cf0.5_s1"]
    assert runs[1].overrides["seed"] == 1 and runs[0].overrides["moe.top_k"] == 2
    assert runs[0].num_train_steps == suite.train["tiny"]["train.num_train_steps"]
    with pytest.raises(ValueError, match=r"no member 't3_cf1\.0'"):
        suite.expand("tiny", seeds=1, members=["t3_cf1.0"])
    with pytest.raises(ValueError, match="scale 'huge' is unknown"):
        suite.expand("huge", seeds=1)


def test_flag_values_round_trip():
    assert format_value(1e-4) == "0.0001" and format_value(False) == "False"
    assert format_value((1, 2, 3)) == "(1, 2, 3)" and format_value((1,)) == "(1,)"
    assert run.parse_setting("train.num_train_steps=50") == ("train.num_train_steps", 50)
    assert run.parse_setting("moe.router=soft") == ("moe.router", "soft")
    with pytest.raises(ValueError, match=r"section\.key=value"):
        run.parse_setting("steps")
    base = schema.load_config("dense.py:tiny")
    assert config_diff(base, schema.load_config("dense.py:tiny")) == {}
