"""The train benchmark suite: fields of a timed step, MFU peaks, ratios, and its Markdown table.
Wall-clock figures are only checked to be positive."""

import json

import pytest

from experiments.benchmarks import run, train
from moe_jax import schema
from moe_jax.analysis import flops


@pytest.fixture(scope="module")
def switch_row():
    """The tiny Switch model, cut to 2 blocks (one sparse) to compile fast, its train step timed
    over 2 steps on 2-row batches."""
    config = schema.override(train.scale_config("switch.py:e8", "tiny", batch_size=2),
                            {"model.num_layers": 2})
    row = train.time_train_step(config, steps=2, warmup=1)
    return config, {**row, "scale": "tiny", "model": "switch_e8", "config": "switch.py:e8",
                    "baseline": "dense"}


def test_time_train_step_fields(switch_row):
    config, row = switch_row
    experiment = schema.parse_config(config)
    seq_len = experiment.model.max_seq_len
    count = flops.count_model(experiment.model, experiment.moe, seq_len=seq_len,
                              tokens_per_group=2 * seq_len)
    assert (row["batch_size"], row["seq_len"], row["tokens_per_step"]) == (2, seq_len,
                                                                           2 * seq_len)
    assert row["timing"]["repeats"] == 2
    assert row["timing"]["median_s"] > 0 and row["timing"]["compile_s"] > 0
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"]
                                                / row["timing"]["median_s"])
    assert row["model_flops_per_token"] == pytest.approx(3 * count.useful_forward_flops_per_token)
    # Capacity factor 1.25 pads the expert rows: the step computes more than the model FLOPs.
    assert row["computed_flops_per_token"] > row["model_flops_per_token"]
    assert row["xla_flops_per_token"] > 0
    assert row["params_active"] < row["params_total"]


def test_mfu_and_ratios(switch_row):
    _, sparse = switch_row
    dense = {**sparse, "model": "dense", "baseline": "", "model_flops_per_token": 2e7,
             "tokens_per_s": 1000.0, "timing": {**sparse["timing"], "median_s": 0.5}}
    sparse = {**sparse, "model_flops_per_token": 2.2e7, "tokens_per_s": 500.0,
              "timing": {**sparse["timing"], "median_s": 1.0}}
    skipped = {"benchmark": "train", "scale": "small", "skipped": "cpu"}
    ceiling = [{"dtype": "float32", "gflops_per_s": 100.0},
               {"dtype": "bfloat16 in, float32 acc", "gflops_per_s": 50.0}]
    rows = train.with_mfu_and_ratios([dense, sparse, skipped], "cpu", "", ceiling)
    assert rows[0]["mfu"] == pytest.approx(2e7 * 1000 / 100e9)
    assert "ratio_step_time" not in rows[0]
    assert rows[1]["ratio_step_time"] == pytest.approx(2.0)
    assert rows[1]["ratio_model_flops"] == pytest.approx(1.1)
    assert rows[2] == skipped
    markdown = run.to_markdown({"machine": {"date": "d", "platform": "cpu", "device_kind": "",
                                            "cpu": "x86", "cpu_count": 2, "jax": "0",
                                            "commit": "c", "load_average_1m": 0.0},
                                "command": "cmd", "rows": rows})
    assert "| tiny switch_e8 | switch.py:e8 | 2 x 128 |" in markdown
    assert "| 2.00 | 1.100 |" in markdown and "skipped: cpu" in markdown
    assert "MFU against float32 matmul ceiling of this run: 100 GFLOP/s." in markdown


def test_peak_flops():
    ceiling = [{"dtype": "float32", "gflops_per_s": 100.0},
               {"dtype": "bfloat16 in, float32 acc", "gflops_per_s": 50.0}]
    assert train.peak_flops("cpu", "", "float32", ceiling)[0] == 100e9
    assert train.peak_flops("cpu", "", "bfloat16", ceiling)[0] == 50e9
    peak, why = train.peak_flops("cpu", "", "float32")
    assert peak is None and "ceiling" in why
    assert train.peak_flops("gpu", "NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989e12
    assert train.peak_flops("gpu", "NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
    peak, why = train.peak_flops("gpu", "Some Future GPU", "bfloat16")
    assert peak is None and "PEAK_BF16" in why


def test_models_are_flop_matched_pairs():
    for scale in ("tiny", "small"):
        chosen = train.models(scale)
        names = {m.name for m in chosen}
        assert all(m.baseline in names for m in chosen if m.baseline)
        for m in chosen:
            if m.baseline:
                config = schema.load_config(m.spec)
                dense = next(b for b in chosen if b.name == m.baseline).spec
                assert config.matched_to == dense


def test_memory_bandwidth_row_and_markdown():
    from experiments.benchmarks import layer
    row = layer.memory_bandwidth(megabytes=4, repeats=2)
    assert row["bytes"] == 4 * 2**20
    assert row["gbytes_per_s"] == pytest.approx(2 * row["bytes"] / row["timing"]["median_s"]
                                                 / 1e9)
    markdown = run.to_markdown({"machine": {"date": "d", "platform": "cpu", "device_kind": "",
                                            "cpu": "x86", "cpu_count": 2, "jax": "0",
                                            "commit": "c", "load_average_1m": 0.0},
                                "command": "cmd", "rows": [row]})
    assert "Memory bandwidth: y = 2x over 4 MB of float32" in markdown


def test_profile_ops_reads_hlo_and_trace(tmp_path):
    import gzip
    import json

    import jax
    import jax.numpy as jnp

    from experiments.benchmarks import profile_ops
    hlo = jax.jit(lambda a, b: jnp.sum(a @ b)).lower(jnp.ones((8, 4)), jnp.ones((4, 2)))
    ops = profile_ops.hlo_ops(hlo.compile().as_text())
    assert any(shape == "f32[]" for shape, _ in ops.values())
    assert any("dot_general" in op_name for _, op_name in ops.values())
    events = [{"ph": "X", "name": "fusion.1", "dur": 3000.0},
              {"ph": "X", "name": "fusion.1", "dur": 1000.0},
              {"ph": "i", "name": "marker", "dur": 5.0}]
    trace = tmp_path / "plugins" / "profile" / "host.trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    totals = profile_ops.op_times(str(tmp_path), steps=2)
    assert totals == {"fusion.1": pytest.approx(2.0)}
    with pytest.raises(FileNotFoundError, match=r"no \*\.trace\.json\.gz"):
        profile_ops.op_times(str(tmp_path / "empty"), steps=1)


def test_train_run_keeps_rows_when_a_model_runs_out_of_memory(monkeypatch):
    import jax

    chosen = train.models("tiny", swiglu=False)[:2]
    monkeypatch.setattr(train, "models", lambda scale, swiglu: chosen)

    def out_of_memory(config, steps, warmup, memory_limit):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.")

    monkeypatch.setattr(train, "time_train_step", out_of_memory)
    rows = train.run(small=False)
    skipped = [r for r in rows if r["scale"] == "tiny"]
    assert [r["model"] for r in skipped] == [m.name for m in chosen]
    assert all("out of memory on cpu: RESOURCE_EXHAUSTED" in r["skipped"] for r in skipped)

    def other_error(config, steps, warmup, memory_limit):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(train, "time_train_step", other_error)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        train.run(small=False)


def test_measure_refuses_a_function_that_needs_more_memory_than_allowed():
    import jax.numpy as jnp

    from experiments.benchmarks.timing import available_host_memory, measure
    x = jnp.ones((256, 256))
    with pytest.raises(MemoryError, match="GiB allowed"):
        measure(lambda x: (x @ x) @ x, x, repeats=1, memory_limit=1024)
    assert measure(lambda x: x @ x, x, repeats=1, memory_limit=2**30).median_s > 0
    assert available_host_memory() > 0


def test_decode_benchmark_expert_counts_follow_the_expectation():
    """Uniform top-k routing of B tokens touches E * (1 - (1 - k/E)^B) experts on average."""
    from experiments.benchmarks import decode

    assert decode.expected_distinct(8, 2, 1) == 2
    assert decode.expected_distinct(64, 8, 1) == 8
    for e, k, b in [(8, 2, 4), (64, 8, 16), (8, 2, 64)]:
        assert decode.uniform_distinct(e, k, b) == pytest.approx(
            decode.expected_distinct(e, k, b), rel=0.03)


def test_command_line_quotes_arguments_for_the_shell():
    import shlex

    from experiments.benchmarks.timing import command_line

    argv = ["runs/a b", "--out=x;y.md"]
    line = command_line("experiments.benchmarks.quantized_experts", argv)
    assert shlex.split(line) == ["python", "-m", "experiments.benchmarks.quantized_experts",
                                 *argv]


def test_quantized_experts_refuses_to_overwrite_a_results_file(tmp_path, capsys):
    from experiments.benchmarks import quantized_experts

    out = tmp_path / "q.md"
    out.write_text("earlier results\n")
    with pytest.raises(SystemExit):  # before restoring the (missing) run
        quantized_experts.main([str(tmp_path / "no_run"), f"--out={out}"])
    assert "would be overwritten" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n"


def test_quantized_change_standard_error_is_the_ratio_estimators():
    import numpy as np

    from experiments.benchmarks.quantized_experts import change_standard_error

    tokens = [100.0, 200.0, 300.0]
    # The same change per token in every batch: no spread.
    assert change_standard_error(np.array([1.0, 2.0, 3.0]), tokens) == pytest.approx(0.0)
    # Changes 0, 4, 0 nats: ratio 4 / 600; residuals -1/1.5 * ..., worked by hand.
    d, t = np.array([0.0, 4.0, 0.0]), np.array(tokens)
    r = 4.0 / 600.0
    expected = np.sqrt(3 / 2 * np.sum((d - r * t) ** 2)) / 600.0
    assert change_standard_error(d, tokens) == pytest.approx(expected)
    assert expected > 0


def test_git_commit_says_when_tracked_files_differ_from_it(tmp_path):
    import subprocess

    from experiments.library.provenance import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-q", "-m", "f")
    clean = git_commit(tmp_path)
    assert clean and "uncommitted" not in clean
    (tmp_path / "untracked.md").write_text("results\n")  # a new results file is not a change
    assert git_commit(tmp_path) == clean
    (tmp_path / "f.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == clean + "+uncommitted changes"


@pytest.mark.slow
def test_suite_throughput_times_members_interleaved_and_refuses_to_overwrite(tmp_path, capsys):
    from experiments.benchmarks import suite_throughput

    out = tmp_path / "tiny_throughput.json"
    argv = ["--suite=switch_scaling", "--scale=tiny", "--members=dense,switch_e4", "--rounds=2",
            "--steps=1", "--warmup=0", f"--out={out}"]
    suite_throughput.main(argv)
    result = json.loads(out.read_text())
    assert [r["member"] for r in result["rows"]] == ["dense", "switch_e4"]
    for row in result["rows"]:
        assert len(row["rounds_tokens_per_s"]) == 2
        assert row["min_tokens_per_s"] <= row["tokens_per_s"] <= row["max_tokens_per_s"]
    assert (tmp_path / "tiny_throughput.md").exists()
    with pytest.raises(SystemExit, match="exists"):
        suite_throughput.main(argv)


def test_layer_ratio_interleaves_dense_and_moe_and_writes_results(tmp_path):
    from experiments.benchmarks import layer_ratio

    out = tmp_path / "ratio.json"
    layer_ratio.main(["--experts=2", "--tokens=64", "--rounds=2", f"--out={out}"])
    result = json.loads(out.read_text())
    dense, sparse = result["rows"]
    assert dense["member"] == "dense FFN" and sparse["member"].startswith("E=2 top-1")
    assert dense["wall_ratio"] == dense["cpu_ratio"] == 1.0
    for row in (dense, sparse):
        assert len(row["rounds_wall_s"]) == len(row["rounds_cpu_s"]) == 2
        assert row["wall_ratio_range"][0] <= row["wall_ratio"] <= row["wall_ratio_range"][1]
    # Two experts' weights and gradients: twice the dense FFN's parameters in the outputs.
    assert sparse["output_bytes"] > 1.9 * dense["output_bytes"]
    assert result["machine"]["commit"] and "layer_ratio" in result["command"]
    assert "interleaved" in (tmp_path / "ratio.md").read_text()
