"""The experiment config: one ml_collections layout, built from the dataclasses, validated once.

    config = schema.base_config()          # sections "model", "moe", plus top-level keys
    config.moe.num_experts = 16            # any MoeConfig / ModelConfig field
    experiment = schema.parse_config(config)
    experiment.model, experiment.moe       # ModelConfig, MoeConfig

Section defaults come from the dataclasses' own defaults (one source of truth); optional fields
are typed ml_collections placeholders, so `--config.moe.expert_capacity=8` works from the
command line. Parsing rejects unknown keys and re-raises the dataclasses' validation errors
with the exact key (`config.moe.router=...`). To add a section (e.g. "train"), add one entry to
`SECTIONS`.

Config files (`configs/*.py`) define `get_config(arg=None)`; family files take a member name
(`configs/switch.py:e16`) and list their members in a module constant `MEMBERS`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import importlib.util
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from moe_jax.config import MoeConfig
from moe_jax.data.config import DataConfig
from moe_jax.models.config import ModelConfig, check_compatible
from moe_jax.parallel.sharding import MeshConfig
from moe_jax.train.config import InitConfig, MonitorConfig, TrainConfig
from moe_jax.utils import storage


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A parsed experiment config: one attribute per section, plus the top-level keys."""

    model: ModelConfig
    moe: MoeConfig
    train: TrainConfig
    data: DataConfig
    mesh: MeshConfig
    monitor: MonitorConfig
    init: InitConfig
    seed: int = 0
    # The dense config (a config spec, relative to configs/) whose forward FLOPs per token this
    # sparse config matches; "" when it is not a matched config. `flops` reports the mismatch.
    matched_to: str = ""


# Section name -> the frozen dataclass it is parsed into (the dataclass-typed fields).
SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Experiment).items()
                             if dataclasses.is_dataclass(hint)}
# Top-level scalar keys and their defaults.
TOP_LEVEL: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Experiment)
                             if f.name not in SECTIONS}

# The experiment config files: the repository's configs/, installed as the package
# `moe_jax.configs` (setup.cfg maps it), so they are found from any directory.
CONFIGS_DIR = Path(importlib.resources.files("moe_jax.configs"))


def _optional_inner(hint: Any) -> type:
    """The X of `X | None` (tuple[int, ...] -> tuple), for a typed placeholder."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    inner = args[0] if args else hint
    return typing.get_origin(inner) or inner


def section_defaults(cls: type) -> ml_collections.ConfigDict:
    """A ConfigDict of `cls`'s fields and defaults (None defaults become typed placeholders)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{field.name} needs a default to be a config section.")
        if default is None:
            default = config_dict.placeholder(_optional_inner(hints[field.name]))
        values[field.name] = default
    return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
    """Every section at its dataclass defaults plus the top-level keys; locked (no new keys)."""
    config = ml_collections.ConfigDict(
        {name: section_defaults(cls) for name, cls in SECTIONS.items()} | dict(TOP_LEVEL))
    config.lock()
    return config


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _parse_section(config: ml_collections.ConfigDict, name: str, cls: type) -> Any:
    section = config[name]
    if not isinstance(section, ml_collections.ConfigDict):
        raise ValueError(f"config.{name} must be a ConfigDict section; got {type(section)}.")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(section.keys()) - set(fields))
    if unknown:
        raise ValueError(f"unknown key config.{name}.{unknown[0]}; {cls.__name__} fields are "
                         f"{fields}.")
    try:
        return cls(**{key: _plain(section[key]) for key in section})
    except (TypeError, ValueError) as err:
        message = str(err).replace(f"{cls.__name__}.", f"config.{name}.")
        raise ValueError(message) from err


def parse_config(config: ml_collections.ConfigDict) -> Experiment:
    """ConfigDict -> `Experiment` (frozen). Raises ValueError naming the offending key."""
    allowed = list(SECTIONS) + list(TOP_LEVEL)
    unknown = sorted(set(config.keys()) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key config.{unknown[0]}; allowed top-level keys: {allowed}.")
    missing = [name for name in SECTIONS if name not in config]
    if missing:
        raise ValueError(f"config.{missing[0]} is missing; start from schema.base_config().")
    parsed = {name: _parse_section(config, name, cls) for name, cls in SECTIONS.items()}
    for name, default in TOP_LEVEL.items():
        value = config.get(name, default)
        if not isinstance(value, type(default)):
            raise ValueError(f"config.{name}={value!r} must be of type {type(default).__name__}.")
        parsed[name] = value
    check_compatible(parsed["model"], parsed["moe"])
    return Experiment(**parsed)


def override(config: ml_collections.ConfigDict,
             settings: typing.Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key settings ("train.batch_size": 8) applied, validated."""
    config = copy.deepcopy(config)
    for key, value in settings.items():
        *sections, field = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[field] = value
    return checked(config)


def checked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates `config` (see `parse_config`) and returns it; config files end with this."""
    parse_config(config)
    return config


def resolve_path(path: str) -> Path:
    """A config file: the path as given (absolute, or relative to the working directory), else
    one of the installed configs, relative to `CONFIGS_DIR` with or without a leading
    "configs/" (so `configs/switch.py` works from any directory)."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    if candidate.parts[:1] == ("configs",):
        candidate = Path(*candidate.parts[1:])
    return CONFIGS_DIR / candidate


def config_files() -> list[str]:
    """The installed config files, relative to `CONFIGS_DIR` (e.g. "published/mixtral_8x7b.py")."""
    return sorted(p.relative_to(CONFIGS_DIR).as_posix() for p in CONFIGS_DIR.rglob("*.py")
                  if p.name != "__init__.py")


def _import_config_module(path: str) -> types.ModuleType:
    file = resolve_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"config file {path!r} not found: it is not a file relative to the working directory "
            f"({Path.cwd()}) nor one of the installed configs in {CONFIGS_DIR} "
            f"({', '.join(config_files())}). Give a path to your own config file, or one of "
            "those names (e.g. configs/switch.py:e8).")
    spec = importlib.util.spec_from_file_location(f"_moe_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_from_json(path: str) -> ml_collections.ConfigDict:
    """The config a run wrote to `<workdir>/config.json` (or `moe_jax.convert` / `upcycle`
    wrote), as a locked ConfigDict: `base_config()` with the file's values (lists become
    tuples), so sections the file lacks keep their defaults. Not validated here."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found; give the config.json of a run's "
                                "workdir (or of a directory written by moe_jax.convert).")
    values = json.loads(storage.read_text(path))
    config = base_config()
    for key, value in values.items():
        if isinstance(value, dict) and key in config:
            for field, item in value.items():
                if field not in config[key]:
                    raise ValueError(f"{path}: unknown key config.{key}.{field}; "
                                     f"{SECTIONS[key].__name__} has no such field.")
                config[key][field] = _plain(item)
        else:
            if key not in config:
                raise ValueError(f"{path}: unknown key config.{key}.")
            config[key] = value
    return config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads and validates `path.py`, `path.py:member` (the ml_collections config_flags form) or
    a run's `config.json`."""
    if spec.endswith(".json"):
        return checked(config_from_json(spec))
    path, _, arg = spec.partition(":")
    module = _import_config_module(path)
    config = module.get_config(arg) if arg else module.get_config()
    return checked(config)


def family_members(path: str) -> tuple[str, ...]:
    """The member names a family config file lists in `MEMBERS` (() for a single config)."""
    return tuple(getattr(_import_config_module(path), "MEMBERS", ()))


class _InstalledConfigParser(flags.ArgumentParser):
    """ml_collections' config-file parser, with the file resolved by `resolve_path` first."""

    def __init__(self, inner: flags.ArgumentParser) -> None:
        self._inner = inner

    def parse(self, argument: str) -> Any:
        if argument.endswith(".json"):
            return config_from_json(argument)
        path, sep, member = argument.partition(":")
        file = resolve_path(path)
        if not file.is_file():
            _import_config_module(path)  # raises FileNotFoundError naming both places
        return self._inner.parse(f"{file}{sep}{member}")

    def flag_type(self) -> str:
        return self._inner.flag_type()


def define_config_flag(help_string: str, *, flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None) -> None:
    """Defines `--config=file.py[:member]` with `--config.<section>.<field>=value` overrides
    (ml_collections `DEFINE_config_file`), the file resolved like `load_config`: a path from
    the working directory, else one of the installed configs (`configs/switch.py:e8` from any
    directory), or a run's config.json. `flag_values["config"].config_filename` keeps the
    argument as given."""
    config_flags.DEFINE_config_file("config", None, help_string, flag_values=flag_values,
                                    lock_config=True,
                                    sys_argv=list(sys_argv) if sys_argv else None)
    flag_values["config"].parser = _InstalledConfigParser(flag_values["config"].parser)
