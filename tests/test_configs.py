"""The experiment config schema and the configs/ tree: defaults, validation, every file loads."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from moe_jax import MoeConfig, schema
from moe_jax.data import DataConfig
from moe_jax.models import ModelConfig
from moe_jax.parallel.sharding import MeshConfig
from moe_jax.train import objective
from moe_jax.train.config import TrainConfig
from moe_jax.utils import fields


def test_sections_mirror_the_dataclass_defaults():
    config = schema.base_config()
    for name, cls in schema.SECTIONS.items():
        assert set(config[name].keys()) == {f.name for f in dataclasses.fields(cls)}
        for field in dataclasses.fields(cls):
            assert config[name][field.name] == field.default, (name, field.name)
    experiment = schema.parse_config(config)
    assert experiment.model == ModelConfig() and experiment.moe == MoeConfig()
    assert experiment.seed == 0 and experiment.matched_to == ""


def test_optional_fields_are_typed_placeholders():
    config = schema.base_config()
    config.moe.expert_capacity = 8
    config.model.moe_layers = (2, 0)
    experiment = schema.parse_config(config)
    assert experiment.moe.expert_capacity == 8
    assert experiment.model.moe_layers == (0, 2)
    with pytest.raises(TypeError):
        config.moe.group_size = "all"


def test_every_config_accepts_moe_overrides():
    config = schema.load_config("dense.py:tiny")
    config.moe.num_experts = 16
    config.model.moe_every = 2
    experiment = schema.parse_config(config)
    assert experiment.moe.num_experts == 16 and experiment.model.sparse_layers == (1, 3)


@pytest.mark.parametrize("section,key,value,message", [
    ("moe", "router", "switch", r"config\.moe\.router='switch' is not supported; use one of"),
    ("moe", "top_k", 9, r"config\.moe\.top_k=9 is larger than num_experts"),
    ("moe", "capacity_factor", 0.0, r"config\.moe\.capacity_factor"),
    ("model", "positions", "alibi", r"config\.model\.positions='alibi' .*'rotary', 'learned'"),
    ("model", "num_kv_heads", 3, r"config\.model\.num_heads=4 must be a multiple"),
])
def test_bad_values_name_the_key_and_the_allowed_values(section, key, value, message):
    config = schema.base_config()
    config[section][key] = value
    with pytest.raises(ValueError, match=message):
        schema.parse_config(config)


def test_unknown_keys_are_errors():
    config = schema.base_config()
    with pytest.raises(AttributeError):  # locked: a typo cannot add a key
        config.moe.num_expert = 4
    unlocked = ml_collections.ConfigDict(config.to_dict())
    unlocked.moe.num_expert = 4
    with pytest.raises(ValueError, match=r"unknown key config\.moe\.num_expert"):
        schema.parse_config(unlocked)
    unlocked = ml_collections.ConfigDict(config.to_dict())
    unlocked.optimizer = ml_collections.ConfigDict({"lr": 1.0})
    with pytest.raises(ValueError, match=r"unknown key config\.optimizer"):
        schema.parse_config(unlocked)


def test_causal_lm_with_expert_choice_is_rejected_at_parse_time():
    config = schema.load_config("dense.py:tiny")
    config.model.moe_every = 2
    config.moe.router = "expert_choice"
    with pytest.raises(ValueError, match="leaks future tokens"):
        schema.parse_config(config)
    config.model.causal = False
    schema.parse_config(config)


def test_bad_config_files_and_members():
    with pytest.raises(FileNotFoundError, match=r"nope\.py"):
        schema.load_config("nope.py")
    with pytest.raises(ValueError, match="member 'e3' is unknown"):
        schema.load_config("switch.py:e3")


CONFIG_FILES = schema.config_files()


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_file_and_member_loads_and_validates(path):
    members = schema.family_members(path)
    specs = [f"{path}:{m}" for m in members] if members else [path]
    for spec in specs:
        experiment = schema.parse_config(schema.load_config(spec))
        assert isinstance(experiment.model, ModelConfig), spec
        # Encoders train with masked LM, decoders with next-token prediction, out of the box.
        objective.check_objective(experiment.train.objective, experiment.model)


def test_experiment_is_a_typed_dataclass_and_sections_come_from_it():
    fields = {f.name for f in dataclasses.fields(schema.Experiment)}
    assert set(schema.SECTIONS) | set(schema.TOP_LEVEL) == fields
    assert schema.SECTIONS["moe"] is MoeConfig and schema.TOP_LEVEL == {"seed": 0,
                                                                        "matched_to": ""}
    with pytest.raises(dataclasses.FrozenInstanceError):
        schema.parse_config(schema.base_config()).seed = 1


@pytest.mark.parametrize(("cls", "field", "value", "message"), [
    (MoeConfig, "top_k", 0, r"MoeConfig\.top_k=0 must be an integer >= 1\."),
    (MoeConfig, "jitter_eps", 1.5, r"MoeConfig\.jitter_eps=1\.5 must be in \[0, 1\)\."),
    (MoeConfig, "dispatch", "scatter", r"MoeConfig\.dispatch='scatter' is not supported; use "
     r"one of \('einsum', 'gather', 'dropless'\)\."),
    (ModelConfig, "dropout_rate", -0.1, r"ModelConfig\.dropout_rate=-0\.1 must be in \[0, 1\)"),
    (TrainConfig, "learning_rate", 0.0, r"TrainConfig\.learning_rate=0\.0 must be a finite "
     r"number > 0\."),
    (TrainConfig, "b2", 1.5, r"TrainConfig\.b2=1\.5 must be in \[0, 1\]\."),
    (DataConfig, "worker_count", -1, r"DataConfig\.worker_count=-1 must be an integer >= 0; 0 "),
    (MeshConfig, "expert", 0, r"MeshConfig\.expert=0 must be a positive integer or -1"),
])
def test_every_section_reports_bad_values_in_one_shape(cls, field, value, message):
    """<Class>.<field>=<value> <what is wrong>[; <fix>]. (one `validation` module for all)."""
    with pytest.raises(fields.ConfigError, match=message):
        cls(**{field: value})


def test_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert schema.resolve_path("configs/switch.py") == schema.CONFIGS_DIR / "switch.py"
    assert schema.resolve_path("switch.py") == schema.CONFIGS_DIR / "switch.py"
    assert schema.load_config("configs/switch.py:e8").moe.num_experts == 8
    own = tmp_path / "configs" / "switch.py"  # a file of the user's own shadows the installed one
    own.parent.mkdir()
    own.write_text("from moe_jax import schema\n\ndef get_config():\n"
                   "    config = schema.base_config()\n    config.seed = 7\n    return config\n")
    assert schema.load_config("configs/switch.py").seed == 7
    with pytest.raises(FileNotFoundError, match=r"installed configs in .*switch\.py"):
        schema.load_config("configs/swich.py")


def test_dense_scales():
    from moe_jax.analysis import flops

    tiny = flops.count(schema.load_config("dense.py:tiny")).total_params
    small = flops.count(schema.load_config("dense.py:small")).total_params
    base = flops.count(schema.load_config("dense.py:base")).total_params
    assert 1e6 <= tiny <= 5e6 and 50e6 <= small <= 150e6 and 150e6 <= base <= 250e6


def test_switch_family_covers_the_expert_counts():
    experts = {schema.load_config(f"switch.py:e{e}").moe.num_experts
               for e in (4, 8, 16, 32, 64, 128)}
    assert experts == {4, 8, 16, 32, 64, 128}
