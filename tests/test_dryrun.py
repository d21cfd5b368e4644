"""`python -m moe_jax.dryrun`: the real train step compiled for TPU topologies (libtpu, no TPU
attached) and for simulated CPU devices; what the report says; bad inputs.

The TPU compilations need libtpu (`pip install -e ".[tpu]"`, which the README's test command and
CI install); without it they skip, saying so.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from moe_jax import dryrun, schema
from moe_jax.analysis import compiled_hlo, dryrun_report, flops, topology

needs_libtpu = pytest.mark.skipif(
    not topology.libtpu_installed(),
    reason='libtpu is not installed: pip install -e ".[tpu]" (CI installs it)')

SWITCH = "configs/switch.py:e8"
# The tiny Switch model at test size: blocks 0 and 2 dense, 1 and 3 with 8 top-1 experts.
TINY = {"model.d_model": 64, "model.num_layers": 4, "model.num_heads": 2, "model.d_ff": 128,
        "moe.d_ff": 128, "model.max_seq_len": 32, "moe.group_size": 32, "train.batch_size": 8}


def config(**settings):
    return schema.override(schema.load_config(SWITCH), {**TINY, **settings})


def experiment(**settings):
    return schema.parse_config(config(**settings))


@functools.cache
def compiled_step(topology_name: str, fsdp: int, expert: int, form: str):
    """`compile_train_step` of the tiny Switch model, given its ConfigDict as a caller would."""
    return dryrun.compile_train_step(config(**{"mesh.fsdp": fsdp, "mesh.expert": expert,
                                               "mesh.expert_parallel": form}),
                                     topology_name, name=SWITCH)


def report(topology_name: str, fsdp: int, expert: int, form: str):
    return compiled_step(topology_name, fsdp, expert, form)[0]


def test_cpu_dryrun_bytes_match_the_parameter_count():
    """fsdp=8 splits every parameter and AdamW moment 8 ways: the per-device bytes are the
    analytic parameter count's (flops.count) / 8, exactly (tolerance 0.1%)."""
    result = report("cpu:8", 8, 1, "gspmd")
    assert result.compiled and result.error is None and result.hbm_bytes is None
    count = flops.count(experiment())
    expected = count.total_params * 4 / 8  # float32 parameters
    assert abs(result.bytes["parameters"] - expected) <= 1e-3 * expected
    assert abs(result.bytes["optimizer"] - 2 * expected) <= 1e-3 * expected + 8  # mu, nu, count
    assert result.bytes["temporaries"] > 0 and result.bytes["peak"] > result.bytes["parameters"]
    assert "all-gather" in result.collectives  # fsdp gathers the weights where they are used
    executable = compiled_step("cpu:8", 8, 1, "gspmd")[1]  # what the report was read from
    assert compiled_hlo.collective_counts(executable.as_text())[0]["all-gather"].per_step == \
        result.collectives["all-gather"]["per_step"]
    assert result.model_flops == pytest.approx(
        count.training_flops_per_token * 8 * 32 / 8, rel=1e-6)


@needs_libtpu
@pytest.mark.parametrize(("name", "fsdp", "expert", "form"), [
    ("v5p:2x2x2", 2, 4, "explicit"),
    pytest.param("v5p:2x2x2", 2, 4, "gspmd", marks=pytest.mark.slow),
    pytest.param("v5e:2x2", 2, 2, "explicit", marks=pytest.mark.slow),
    pytest.param("v5e:2x2", 2, 2, "gspmd", marks=pytest.mark.slow),
])
def test_tiny_switch_train_step_compiles_for_tpu(name, fsdp, expert, form):
    result = report(name, fsdp, expert, form)
    assert result.compiled, result.error
    chip = topology.CHIPS[name.split(":")[0]]
    assert result.hbm_bytes == chip.hbm_bytes and result.fits
    assert result.mesh == {"data": 1, "fsdp": fsdp, "expert": expert, "model": 1}
    e = result.estimate
    assert 0 < e["serial_mfu"] < e["overlap_mfu"] < 1
    assert e["overlap_step_seconds"] == max(
        e[k] for k in ("compute_seconds", "memory_seconds", "communication_seconds"))
    assert e["serial_step_seconds"] == pytest.approx(
        e["compute_seconds"] + e["memory_seconds"] + e["communication_seconds"])
    assert e["communication_seconds"] == pytest.approx(sum(result.communication_seconds.values()))
    assert set(result.communication_seconds) == set(result.collectives)
    # Every collective of the fsdp x expert mesh runs over one axis or all devices.
    assert {int(g) for c in result.collectives.values() for g in c["bytes_per_step_by_group"]
            } <= {1, fsdp, expert, fsdp * expert}, result.collectives
    if form == "explicit":  # 2 exchanges per MoE block forward, 2 backward, 2 MoE blocks
        assert result.collectives["all-to-all"]["per_step"] >= 8, result.collectives
        assert expert in result.collectives["all-to-all"]["bytes_per_step_by_group"]
    # `experts.few_rows_matmul` (taken at 4 rows per expert here) is a conditional on the
    # platform; XLA removes it from the TPU program.
    assert "conditional" not in compiled_step(name, fsdp, expert, form)[1].as_text()
    text = dryrun_report.markdown(result)
    assert "est. step: overlap / serial" in text and "ICI bound s" in text
    assert result.bytes["parameters"] < result.bytes["optimizer"] < result.bytes["peak"]


@needs_libtpu
@pytest.mark.slow
def test_remat_lowers_the_tpu_compilations_temporaries():
    """XLA:CPU ignores remat; the TPU compilation shows it. 8 scanned blocks of the tiny
    Switch model at full width (d 192) and 2048 tokens per device: kept activations grow with
    depth, a rematerialised step keeps one block's."""
    def temporaries(policy: str) -> int:
        config = schema.override(schema.load_config(SWITCH), {
            "model.num_layers": 8, "model.scan_layers": True, "model.remat_policy": policy,
            "train.batch_size": 16, "moe.group_size": 128, "mesh.fsdp": 2, "mesh.expert": 2})
        result = dryrun.dryrun(schema.parse_config(config), "v5e:2x2")
        assert result.compiled, result.error
        return result.bytes["temporaries"]

    assert temporaries("full") < 0.5 * temporaries("none")


def test_collectives_are_counted_per_loop_iteration():
    hlo = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %c = s32[] constant(3)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %a2a = f32[8]{0} all-to-all(%x), replica_groups={{0,1}}, dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %a2a)
}

ENTRY %main (x: f32[8]) -> f32[16] {
  %x = f32[8]{0} parameter(0)
  %ag = f32[16]{0:T(128)} all-gather-start(%x), dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ag)
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
}
"""
    found, unknown = compiled_hlo.collective_counts(hlo)
    assert unknown == 0 and compiled_hlo.loop_trip_counts(hlo) == [3]
    assert found["all-to-all"] == compiled_hlo.Collective(1, 3, 32, 96, {2: 96})
    # -done not counted again; no replica groups and no num_partitions: one device
    assert found["all-gather"] == compiled_hlo.Collective(1, 1, 64, 64, {1: 64})


def test_collective_group_sizes_and_async_results_are_read():
    hlo = """HloModule m, num_partitions=8

ENTRY %main (x: bf16[4,8]) -> bf16[32,8] {
  %x = bf16[4,8]{1,0} parameter(0)
  %ag = (bf16[4,8], bf16[32,8]) all-gather-start(%x), replica_groups=[1,8]<=[8], dimensions={0}
  %agd = bf16[32,8]{1,0} all-gather-done(%ag)
  %ar = f32[16]{0} all-reduce(%y), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ar2 = f32[16]{0} all-reduce(%y), replica_groups={}, to_apply=%add
  %a2a = f32[2,4]{1,0} all-to-all(%z), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
  %b = f32[2,4] all-to-all(z), replica_groups=mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a','b'}
  %cp = (bf16[4,8], bf16[4,8], u32[], u32[]) collective-permute-start(%x), channel_id=1
}
"""
    found, _ = compiled_hlo.collective_counts(hlo)
    assert found["all-gather"].result_bytes == 32 * 8 * 2  # the gathered array, not the operand
    assert found["all-gather"].bytes_per_step_by_group == {8: 512}
    assert found["all-reduce"].bytes_per_step_by_group == {4: 64, 8: 64}
    assert found["collective-permute"].bytes_per_step_by_group == {1: 64}
    assert found["all-to-all"].bytes_per_step_by_group == {4: 32, 8: 32}


def test_a_compile_refused_for_memory_says_by_how_much_and_which_knobs_help():
    result = dryrun_report.Report(
        config="c", topology="v5e:2x2", chip="v5e", devices=4,
        mesh={"data": 1, "fsdp": 2, "expert": 2, "model": 1}, expert_parallel="gspmd",
        scan_layers=True, remat_policy="none", batch_size=8, seq_len=32,
        bytes={"parameters": 2 * topology.GIB, "optimizer": 4 * topology.GIB, "other_state": 0,
               "batch": 1024},
        error="XlaRuntimeError: RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
              "memory in memory space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm capacity by "
              "5.02G.")
    dryrun_report.out_of_memory(result, experiment(**{"mesh.fsdp": 2, "mesh.expert": 2}))
    assert result.fits is False and result.bytes["peak"] == int(20.5 * topology.GIB)
    assert result.hbm_bytes == int(15.48 * topology.GIB)
    assert result.advice[0] == "over by 5.02 GiB"
    assert [tip.split(":")[0] for tip in result.advice[1:]] == ["remat", "smaller batch", "fsdp"]
    result.error = ("JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
                    "memory required for HLO temporaries (54.18G) exceeds available HBM "
                    "(15.75G).")
    dryrun_report.out_of_memory(result, experiment(**{"mesh.fsdp": 2, "mesh.expert": 2}))
    assert result.bytes["temporaries"] == int(54.18 * topology.GIB)
    assert result.bytes["peak"] == result.bytes["temporaries"] + 6 * topology.GIB + 1024
    assert result.advice[1].startswith("remat: temporaries take 54.18 GiB")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "message"), [
    ("v9x:2x2", r"topology 'v9x:2x2' is not a known TPU generation .*pass v5p:4x4x4"),
    ("v5p", r"topology 'v5p' is not a known TPU generation"),
    ("v5p:big", r"has no chip grid like 4x4 or 2x4x4"),
    ("cpu:eight", r"does not give a positive number of CPU devices"),
    ("cpu:64", r"needs 64 CPU devices but this process has 8; start Python with "
     r"XLA_FLAGS=--xla_force_host_platform_device_count=64"),
])
def test_an_unknown_topology_names_the_accepted_forms(name, message):
    with pytest.raises(ValueError, match=message):
        topology.get(name)


def test_a_mesh_that_leaves_devices_idle_is_refused():
    with pytest.raises(ValueError, match=r"mesh \{'data': 1, 'fsdp': 2, 'expert': 2, 'model': 1\}"
                       r" uses 4 of the 8 devices of topology 'cpu:8'; make the product"):
        dryrun.dryrun(experiment(**{"mesh.fsdp": 2, "mesh.expert": 2}), "cpu:8")


@needs_libtpu
def test_a_mesh_axis_across_the_chip_grid_is_refused():
    """8 = 2 x 4 cuts a 4x4x4 grid's axis of 4 in two: libtpu cannot lay it out."""
    with pytest.raises(ValueError, match=r"mesh \{'data': 1, 'fsdp': 8, 'expert': 8, 'model': 1\}"
                       r" does not lay out on the TPU chip grid: each mesh axis must be a "
                       r"product of some of the grid's dimensions"):
        dryrun.dryrun(experiment(**{"mesh.fsdp": 8, "mesh.expert": 8}), "v5p:4x4x4")


def test_missing_libtpu_says_what_to_install(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r'needs libtpu, which is not installed: run `pip '
                       r'install -e "\.\[tpu\]"`'):
        topology.get("v5p-128")


def test_accelerator_types_name_their_topologies():
    assert topology.ACCELERATOR_TYPES["v5p-128"] == "v5p:4x4x4"  # v5p counts TensorCores
    assert topology.ACCELERATOR_TYPES["v5e-256"] == "v5e:16x16"


def test_command_line_reports_a_bad_topology(tmp_path):
    command = [sys.executable, "-m", "moe_jax.dryrun", f"--config={SWITCH}",
               f"--output={tmp_path}", *(f"--config.{k}={v}" for k, v in TINY.items()),
               "--config.mesh.data=-1"]
    bad = subprocess.run([*command, "--topology=v9x:4"], capture_output=True, text=True,
                         env=os.environ, timeout=600)
    assert bad.returncode != 0 and "moe_jax.dryrun: topology 'v9x:4'" in bad.stderr


@pytest.mark.slow
def test_command_line_writes_json_and_markdown(tmp_path):
    subprocess.run([sys.executable, "-m", "moe_jax.dryrun", f"--config={SWITCH}",
                    "--topology=cpu:4", f"--output={tmp_path}", "--config.mesh.data=-1",
                    *(f"--config.{k}={v}" for k, v in TINY.items())],
                   check=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=900)
    written = json.loads((tmp_path / "switch_e8_cpu_4.json").read_text())
    assert written["compiled"] and written["devices"] == 4
    assert "| configs/switch.py:e8 | cpu:4 |" in (tmp_path / "switch_e8_cpu_4.md").read_text()


def _gradient_temp_bytes(model, moe, inputs) -> int:
    """Temporaries of the mean logit's gradient compiled for one v5p chip (memory analysis)."""
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from moe_jax.models import Transformer

    net = Transformer(model, moe)
    chip = NamedSharding(Mesh(np.array(topology.get("v5p:2x2x1").devices[:1]), ("x",)),
                         PartitionSpec())
    params = jax.eval_shape(lambda k: nn.meta.unbox(net.init({"params": k}, inputs,
                                                              train=False)), jax.random.key(0))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=chip),
                          params["params"])

    def loss(p):
        return net.apply({"params": p}, inputs, train=False)[0].mean()

    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


@needs_libtpu
def test_full_remat_recomputes_the_unrolled_prefix_of_a_scanned_model():
    """Two more dense blocks unrolled before the scanned ones (DeepSeek-V3's first 3 dense
    blocks) cost less than one block's attention scores [B, H, L, L] under full remat: their
    recomputation keeps its CSE barrier, so XLA does not merge it with the forward pass and
    keep every prefix block's scores through the backward pass (it did: +3.2 x the scores)."""
    import numpy as np

    from moe_jax.config import MoeConfig
    from moe_jax.models import ModelConfig

    rows, heads, length = 4, 16, 128
    scores = rows * heads * length * length * 4  # float32, 4 MiB
    inputs = np.ones((rows, length), np.int32)
    model = ModelConfig(vocab_size=64, vocab_multiple=64, d_model=32, num_layers=3,
                        num_heads=heads, d_ff=64, max_seq_len=length, scan_layers=True,
                        remat_policy="full", moe_layers=(1, 2))
    moe = MoeConfig(num_experts=4, top_k=2, d_ff=32, group_size=length)
    one = _gradient_temp_bytes(model, moe, inputs)
    three = _gradient_temp_bytes(model.replace(num_layers=5, moe_layers=(3, 4)), moe, inputs)
    assert three - one < scores, (one, three)
