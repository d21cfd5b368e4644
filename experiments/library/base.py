"""What a suite is: members (a config plus overrides), scales, seeds, and the claims it checks.

    suite = suites.get("capacity")
    for run in suite.expand("tiny", seeds=3):       # members x seeds, in order
        run.config, run.overrides, run.workdir_name  # "switch.py:e16", {...}, "t1_cf0.5_s0"

A member is one (config file[:member], dotted overrides) pair, exactly what
`python -m moe_jax.main --config=FILE[:member] --config.<key>=<value>` takes; `command()` prints
that command. Overrides are applied in order: the scale's training settings (`SCALES`), the
suite's own settings for that scale, then the member's, then `seed`. Configs stay in configs/:
a suite only names them and adjusts a few fields (steps, capacity factor, coefficients).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from moe_jax import schema
from moe_jax.analysis import flops

SCALE_NAMES = ("tiny", "cpu", "mini", "small", "paper")
# The model sizes each scale trains: `cpu` trains the tiny models for longer (more tokens per run);
# `mini` trains smaller models (dense.py:mini) on far more tokens per parameter.
MODEL_SIZE = {"tiny": "tiny", "cpu": "tiny", "mini": "mini", "small": "small", "paper": "base"}

# Training settings shared by every suite at a scale (a suite may change any of them).
SCALES: dict[str, dict[str, Any]] = {
    # 2 shared CPU cores: byte-level tiny models (dense.py:tiny, ~1.9M active params), one
    # 128-token sequence per row, the embedded corpus (no run sees a token twice at these
    # step counts, so the training loss is a held-out estimate too).
    "tiny": {
        "data.name": "embedded", "data.eval_batches": 16, "train.batch_size": 16,
        "train.learning_rate": 3e-3, "train.log_every": 5, "train.eval_every": 0,
        "train.checkpoint_every": 0, "train.max_to_keep": 1, "train.progress_bar": False,
    },
    # 2 CPU cores, hours rather than minutes: the tiny models trained long enough for the
    # headline claims to resolve (sized in experiments/README.md, "The cpu scale"). Checkpoints
    # every 150 steps, so a killed run resumes from its run directory.
    "cpu": {
        "data.name": "embedded", "data.eval_batches": 16, "train.batch_size": 16,
        "train.learning_rate": 3e-3, "train.log_every": 10, "train.eval_every": 0,
        "train.checkpoint_every": 150, "train.max_to_keep": 1, "train.progress_bar": False,
    },
    # 2 CPU cores, calibrated so that model capacity shows (experiments/README.md, "The mini
    # scale"): d 64 models trained on tens of tokens per parameter, on the large embedded corpus
    # (~14M training tokens: no run sees a token twice). Checkpoints every 500 steps.
    "mini": {
        "data.name": "embedded_large", "data.eval_batches": 128, "train.batch_size": 16,
        "train.learning_rate": 3e-3, "train.log_every": 20, "train.eval_every": 0,
        "train.checkpoint_every": 500, "train.max_to_keep": 1, "train.progress_bar": False,
    },
    # One GPU (sized for ~1 hour per suite; an estimate, not measured: see README).
    "small": {
        "data.name": "embedded", "data.eval_batches": 32, "train.batch_size": 32,
        "train.learning_rate": 1e-3, "train.log_every": 10, "train.eval_every": 0,
        "train.checkpoint_every": 0, "train.max_to_keep": 1, "train.progress_bar": False,
        "model.dtype": "bfloat16",
    },
    # Full-size configs for FLOP/parameter tables only (not run here): the Switch/T5 protocol of
    # 2^20 tokens per batch (2048 x 512) on C4 with Adafactor and an inverse-sqrt schedule.
    "paper": {
        "data.name": "c4/en", "train.batch_size": 2048, "train.optimizer": "adafactor",
        "train.schedule": "rsqrt", "train.learning_rate": 1e-2, "train.warmup_steps": 10_000,
        "train.num_train_steps": 100_000, "train.progress_bar": False, "model.dtype": "bfloat16",
    },
}


@dataclasses.dataclass(frozen=True)
class Member:
    """One configuration of a suite: `config` ("file.py[:member]", relative to configs/) with
    dotted `overrides`; `tags` are the values plots and claims group by (e.g. experts=16)."""

    name: str
    config: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # A member of the same suite whose run of the same seed this member starts from: its
    # workdir (a sibling, <member>_s<seed>) becomes `init.checkpoint` (see RunSpec.flags). That
    # member must come earlier in the suite, so the runner has trained it.
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: a member at a scale with a seed."""

    suite: str
    scale: str
    member: Member
    seed: int
    overrides: Mapping[str, Any]  # everything passed as --config.<key>=<value>, seed included

    @property
    def config(self) -> str:
        return self.member.config

    @property
    def workdir_name(self) -> str:
        return f"{self.member.name}_s{self.seed}"

    @property
    def num_train_steps(self) -> int:
        return int(self.overrides["train.num_train_steps"])

    def init_workdir(self, workdir: str) -> str | None:
        """The workdir of the run this one starts from (`Member.init_from`), beside `workdir`."""
        if not self.member.init_from:
            return None
        return os.path.join(os.path.dirname(workdir), f"{self.member.init_from}_s{self.seed}")

    def flags(self, workdir: str | None = None) -> list[str]:
        """The moe_jax.main flags of this run, workdir excluded (with `workdir`, a member's
        `init_from` becomes --config.init.checkpoint=<that member's workdir>)."""
        init = self.init_workdir(workdir) if workdir else None
        return [f"--config=configs/{self.config}"] + [
            f"--config.{key}={format_value(value)}" for key, value in self.overrides.items()] + (
            [f"--config.init.checkpoint={init}"] if init else [])

    def command(self, workdir: str) -> str:
        return shlex.join(["python", "-m", "moe_jax.main", *self.flags(workdir),
                           f"--workdir={workdir}"])

    def build_config(self) -> ml_collections.ConfigDict:
        """The validated ConfigDict this run trains (raises ValueError naming a bad key)."""

        init = {"init.checkpoint": f"<{self.member.init_from}_s{self.seed}>"} \
            if self.member.init_from else {}
        return schema.override(schema.load_config(self.config), {**self.overrides, **init})


@dataclasses.dataclass(frozen=True)
class Claim:
    """A published claim, the paper's number, and how our runs test it.

    `check(results)` returns an `stats.Outcome` (verdict, our measured number, the rule)."""

    id: str
    statement: str
    source: str  # paper, table/figure
    paper_value: str  # what the paper reports, quoted with its units
    check: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure of the report: `draw(results, path)` writes a PNG to `path`."""

    name: str
    caption: str
    draw: Callable[[Any, str], None]


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of the report beyond the per-member results: `build(results)` returns Markdown."""

    name: str
    caption: str
    build: Callable[[Any], str]


@dataclasses.dataclass(frozen=True)
class Suite:
    """A paper comparison: members per scale, shared training settings, claims, tables and
    figures.

    members: scale -> the members at that scale.
    train: scale -> overrides applied to every member (on top of `SCALES[scale]`).
    analysis: a module run as `python -m <analysis> --workdir=DIR` after each finished run,
      writing DIR/analysis.json (used by routing_analysis); "" for none.
    precheck: called before training; raises (naming the fix) if the suite cannot run yet.
    notes: what the scale can and cannot show, for the report.
    """

    name: str
    title: str
    references: tuple[str, ...]
    members: Callable[[str], tuple[Member, ...]]
    train: Mapping[str, Mapping[str, Any]]
    claims: tuple[Claim, ...]
    figures: tuple[Figure, ...] = ()
    columns: tuple[str, ...] = ()  # extra `results.METRICS` shown in the report's table
    tables: tuple[Table, ...] = ()  # derived tables, after the claims
    analysis: str = ""
    notes: str = ""
    precheck: Callable[[], None] | None = None  # raises if the suite cannot run yet

    def member_list(self, scale: str) -> tuple[Member, ...]:
        check_scale(scale)
        members = self.members(scale)
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r} has duplicate member names: {names}.")
        return members

    def expand(self, scale: str, seeds: int, members: Sequence[str] = (),
               extra: Mapping[str, Any] | None = None) -> list[RunSpec]:
        """Every (member, seed) run of `scale`, members in suite order, seeds 0..seeds-1.

        members: restrict to these names (ValueError lists the valid ones); extra: overrides
        applied to every run after the suite's own (e.g. a shorter schedule).
        """
        if not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds={seeds!r} must be a positive integer (seeds 0..seeds-1).")
        chosen = self.member_list(scale)
        order = [m.name for m in chosen]
        for m in chosen:
            if m.init_from and (m.init_from not in order
                                or order.index(m.init_from) > order.index(m.name)):
                raise ValueError(f"suite {self.name!r}: member {m.name!r} starts from "
                                 f"{m.init_from!r}, which must be an earlier member.")
        if members:
            known = {m.name for m in chosen}
            unknown = [m for m in members if m not in known]
            if unknown:
                raise ValueError(f"suite {self.name!r} has no member {unknown[0]!r} at scale "
                                 f"{scale!r}; members: {sorted(known)}.")
            chosen = tuple(m for m in chosen if m.name in members)
        common = {**SCALES[scale], **self.train.get(scale, {})}
        runs = []
        for member in chosen:
            for seed in range(seeds):
                overrides = {**common, **member.overrides, **(extra or {}), "seed": seed}
                if "train.num_train_steps" not in overrides:
                    raise ValueError(f"suite {self.name!r} at scale {scale!r} sets no "
                                     "train.num_train_steps; add it to the suite's `train`.")
                runs.append(RunSpec(self.name, scale, member, seed, overrides))
        return runs


def check_scale(scale: str) -> None:
    if scale not in SCALE_NAMES:
        raise ValueError(f"scale {scale!r} is unknown; use one of {SCALE_NAMES}.")


def format_value(value: Any) -> str:
    """A value as a --config.<key>= flag string that ml_collections parses back to itself."""
    if isinstance(value, bool | int | str):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") \
            + ")"
    raise ValueError(f"override value {value!r} of type {type(value).__name__} cannot be passed "
                     "on the command line; use a bool, int, float, str or tuple.")


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted key: value} of every leaf of `config` (lists become tuples)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            out[prefix[:-1]] = tuple(node) if isinstance(node, list) else node

    walk("", config.to_dict())
    return out


def config_diff(base: ml_collections.ConfigDict,
                target: ml_collections.ConfigDict) -> dict[str, Any]:
    """The dotted overrides that turn `base` into `target` (same layout), in key order."""
    a, b = flatten(base), flatten(target)
    return {key: b[key] for key in sorted(b) if a.get(key) != b[key]}


@functools.cache
def _rematched(spec: str, dense: str, model: tuple[tuple[str, Any], ...],
               changes: tuple[tuple[str, Any], ...]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    config = schema.load_config(spec)
    dense = dense or config.matched_to
    if not dense:
        raise ValueError(f"{spec} names no FLOP-matched dense baseline (matched_to); pass dense=.")
    recipe = {k: v for k, v in config.moe.to_dict().items() if k not in ("d_ff", "activation")}
    layout = {"moe_every": config.model.moe_every, "moe_layers": config.model.moe_layers}
    target = flops.match_flops(schema.load_config(dense), matched_to=dense,
                               **{**layout, **dict(model)}, **{**recipe, **dict(changes)}).config
    base_spec = spec if dense == config.matched_to else dense
    return base_spec, tuple(config_diff(schema.load_config(base_spec), target).items())


def rematched(name: str, spec: str, *, dense: str = "", tags: Mapping[str, Any] | None = None,
              model: Mapping[str, Any] | None = None, **changes: Any) -> Member:
    """A member with the routing recipe of family config `spec` (its whole moe section) changed
    by `changes` (MoeConfig fields) and `model` (moe_every / moe_layers), its expert width
    re-solved by `flops.match_flops` to keep the useful FLOPs/token of the dense baseline
    (`spec`'s matched_to, or `dense`: the recipe moved onto another baseline). The member is
    `spec` (or `dense`) plus the overrides that make the difference, e.g.
    rematched("e2", "switch.py:e4", num_experts=2) -> switch.py:e4 with num_experts=2, d_ff=767.
    """
    base_spec, overrides = _rematched(spec, dense, tuple(sorted((model or {}).items())),
                                      tuple(sorted(changes.items())))
    return Member(name, base_spec, dict(overrides), dict(tags or {}))


def dense_variant(scale: str, variant: str = "") -> str:
    """The dense baseline spec of a scale: dense.py:tiny (tiny, cpu), dense.py:small,
    dense.py:base (paper)."""
    check_scale(scale)
    return f"dense.py:{MODEL_SIZE[scale]}{variant}"


def family(name: str, scale: str, member: str) -> str:
    """A family member spec at a scale: family("switch.py", "small", "e16") -> switch.py:small_e16
    (tiny members carry no prefix; the paper scale is the families' `base` width)."""
    check_scale(scale)
    size = MODEL_SIZE[scale]
    return f"{name}:{'' if size == 'tiny' else size + '_'}{member}"
