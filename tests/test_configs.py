"""The experiment config schema and the configs/ tree: defaults, validation, every file loads."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from moe_jax import MoeConfig, objective, schema
from moe_jax.models import ModelConfig


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


CONFIG_FILES = sorted(p.relative_to(schema.CONFIGS_DIR).as_posix()
                      for p in schema.CONFIGS_DIR.rglob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_file_and_member_loads_and_validates(path):
    members = schema.family_members(path)
    specs = [f"{path}:{m}" for m in members] if members else [path]
    for spec in specs:
        experiment = schema.parse_config(schema.load_config(spec))
        assert isinstance(experiment.model, ModelConfig), spec
        # Encoders train with masked LM, decoders with next-token prediction, out of the box.
        objective.check_objective(experiment.train.objective, experiment.model)


def test_dense_scales():
    from moe_jax import flops

    tiny = flops.count(schema.load_config("dense.py:tiny")).total_params
    small = flops.count(schema.load_config("dense.py:small")).total_params
    base = flops.count(schema.load_config("dense.py:base")).total_params
    assert 1e6 <= tiny <= 5e6 and 50e6 <= small <= 150e6 and 150e6 <= base <= 250e6


def test_switch_family_covers_the_expert_counts():
    experts = {schema.load_config(f"switch.py:e{e}").moe.num_experts
               for e in (4, 8, 16, 32, 64, 128)}
    assert experts == {4, 8, 16, 32, 64, 128}
