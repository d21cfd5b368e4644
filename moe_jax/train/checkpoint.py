"""Checkpoints with orbax: the train state and the input pipeline's position, saved together.

    checkpoints = Checkpoints(workdir + "/checkpoints", max_to_keep=2, async_save=True)
    checkpoints.save(step, state, host_state)             # returns at once when async
    state, host_state = checkpoints.restore(step, abstract_state)
    weights, step = read_weights(workdir, abstract_state)  # parameters only

A checkpoint directory `<step>/` holds two items: "state" (the `TrainState` pytree, including
the step and the RNG key) and "host" (JSON: the data iterator's position and other host-side
progress), so a restored run sees the same batches and randomness as an uninterrupted one.
Orbax writes each checkpoint to a temporary directory and renames it when complete (on
Cloud Storage, which cannot rename, it writes a commit_success.txt last), so a run killed
mid-save leaves the previous checkpoints intact. Directories may be gs:// URLs (`storage`).
Restoring never deletes or rewrites anything; a checkpoint that cannot be read raises
`CheckpointError` naming the step and the directory.

An *initial* checkpoint (`write_initial`, used by `moe_jax.convert` and `moe_jax.interop.upcycle`)
is the same layout with only {"params", "model_state"} as its state and {"initial": {...}} (where
the parameters came from) as its host item: a starting point for runs (`InitConfig.checkpoint`), not
a run to resume. `read_weights` reads the parameters and model state of either kind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moe_jax.utils import storage

STATE_ITEM = "state"
HOST_ITEM = "host"
CHECKPOINT_DIR = "checkpoints"  # <workdir>/checkpoints/<step>/
INITIAL = "initial"  # host-item key of an initial (parameters-only) checkpoint
VARIABLES = ("params", "model_state")  # what an initial checkpoint holds, and what runs read
COMMIT_MARKER = "commit_success.txt"  # orbax writes it last into a checkpoint on gs://


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored (corrupt, incomplete, or from another config)."""


class Checkpoints:
    """An orbax `CheckpointManager` over `directory`, one checkpoint per saved step.

    max_to_keep: the newest checkpoints kept; older ones are deleted after a successful save.
    async_save: write in a background thread (`wait` blocks until writes finish).
    """

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True) -> None:
        self.directory = storage.absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(STATE_ITEM, HOST_ITEM))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def saved_state_tree(self, step: int) -> Any:
        """The tree of checkpoint `step`'s train state, with array metadata (shape, dtype) for
        leaves, read without restoring any array."""
        return ocp.StandardCheckpointHandler().metadata(
            epath.Path(self.step_directory(step)) / STATE_ITEM)

    def save(self, step: int, state: Any, host_state: dict[str, Any]) -> None:
        """Saves `state` and the JSON-serialisable `host_state` as checkpoint `step`."""
        self._manager.save(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            HOST_ITEM: ocp.args.JsonSave(host_state),
        }), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, host_state) of checkpoint `step`, shaped (and sharded) like `abstract_state`
        (a pytree of `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`).

        Raises CheckpointError naming the step and directory if it cannot be read or does not
        match `abstract_state`; nothing is deleted.
        """
        path = self.step_directory(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                HOST_ITEM: ocp.args.JsonRestore(),
            }))
        except Exception as err:  # orbax raises many types (ValueError, OSError, tensorstore)
            cause = (str(err).splitlines() or [""])[0][:300]  # the full error is chained below
            raise CheckpointError(
                f"could not restore the checkpoint of step {step} in {path}: "
                f"{type(err).__name__}: {cause}\nIt is corrupt or incomplete, or was written by a "
                "run with a different model/optimizer config (compare config.json in the "
                "workdir with this run's config). Nothing was deleted. To resume from an "
                f"earlier checkpoint, move {path} out of {self.directory}; to start afresh, use "
                "a new --workdir.") from err
        return restored[STATE_ITEM], restored[HOST_ITEM]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def check_not_initial(workdir: str) -> None:
    """Raises CheckpointError if `workdir` holds an initial checkpoint (moe_jax.convert or
    moe_jax.interop.upcycle output): a starting point for runs, never trained in (checkpoint
    rotation would delete it)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR, "0")
    if storage.isdir(os.path.join(directory, HOST_ITEM)) and INITIAL in read_host(directory):
        raise CheckpointError(
            f"{workdir} holds the initial parameters written by moe_jax.convert or "
            "moe_jax.interop.upcycle, a starting point rather than a run to resume; train in a new "
            f"workdir that starts from them: --config.init.checkpoint={workdir} "
            "--workdir=runs/NAME (its config.json already sets init.checkpoint). Nothing was "
            "changed.")


def read_host(step_directory: str) -> dict[str, Any]:
    """The host item (JSON) of one checkpoint directory."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.join(step_directory, HOST_ITEM))


def step_directory(path: str, step: int | None = None) -> str:
    """The checkpoint directory `path` names: a workdir or its checkpoints/ directory (checkpoint
    `step`, default the newest), or one checkpoints/<step> directory. Raises CheckpointError."""
    path = storage.absolute(path)
    if storage.isdir(os.path.join(path, STATE_ITEM)):
        if step is None or os.path.basename(path) == str(step):
            return path
        raise CheckpointError(
            f"{path} is one checkpoint, not a run, so step {step} cannot be chosen in it; pass "
            "the run's workdir (or its checkpoints/ directory) to choose a step, or no step.")
    directory = os.path.join(path, CHECKPOINT_DIR) if storage.isdir(
        os.path.join(path, CHECKPOINT_DIR)) else path
    steps = complete_steps(directory)
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {path}: expected a run's workdir (with checkpoints/<step>/), a "
            "directory written by moe_jax.convert or moe_jax.interop.upcycle, or one "
            "checkpoints/<step> directory.")
    if step is not None and step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {directory} (saved: {steps}); "
                              "train that run first or pick a saved step.")
    return os.path.join(directory, str(steps[-1] if step is None else step))


def complete_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints in a checkpoints/ directory, ascending."""
    return sorted(int(name) for name in storage.listdir(directory) if name.isdigit()
                  and _complete(os.path.join(directory, name)))


def _complete(step_directory: str) -> bool:
    """Whether a checkpoint directory was written to the end: it has its state item and, on
    Cloud Storage, orbax's commit marker (there a killed save leaves its directory behind)."""
    if not storage.isdir(os.path.join(step_directory, STATE_ITEM)):
        return False
    return (storage.scheme(step_directory) != "gs"
            or storage.exists(os.path.join(step_directory, COMMIT_MARKER)))


def read_weights(path: str, target: Any = None,
                 step: int | None = None) -> tuple[dict[str, Any], int]:
    """({"params": ..., "model_state": ...}, the step read) of the checkpoint `path` names (see
    `step_directory`): a run's (its optimizer state is not read) or an initial one.

    With `target` (a mapping or train state holding "params" and "model_state" as abstract
    arrays, e.g. `jax.eval_shape` of the train state, with or without shardings) the arrays are
    read into its shapes and shardings; without it, as NumPy arrays of the saved shapes. Raises
    CheckpointError naming the directory when there is no such checkpoint or it does not fit."""
    directory = step_directory(path, step)
    try:
        if target is None:  # the saved shapes, from the handler's metadata
            tree = ocp.PyTreeCheckpointHandler().metadata(
                epath.Path(directory) / STATE_ITEM).tree
            item = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                       tree.get(name, {})) for name in VARIABLES}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        else:
            item = {name: target[name] if isinstance(target, Mapping) else getattr(target, name)
                    for name in VARIABLES}
            restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        weights = ocp.PyTreeCheckpointer().restore(
            os.path.join(directory, STATE_ITEM), args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
    except Exception as err:  # orbax raises many types (ValueError, OSError, tensorstore)
        cause = (str(err).splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"could not read the parameters of the checkpoint in {directory} into this model "
            f"({type(err).__name__}: {cause}). They must have this run's names and shapes: the "
            "same model section and MoE layer sizes (dropout, temperature, capacity and loss "
            "settings may differ).") from err
    return weights, int(os.path.basename(directory))


def write_initial(workdir: str, variables: dict[str, Any], source: dict[str, Any]) -> str:
    """Saves {"params", "model_state"} as the initial checkpoint <workdir>/checkpoints/0 with
    `source` (JSON: where the parameters came from) in its host item; returns its directory."""
    checkpoints = Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=1,
                              async_save=False)
    try:
        checkpoints.save(0, {name: variables[name] for name in VARIABLES}, {INITIAL: source})
        checkpoints.wait()
    finally:
        checkpoints.close()
    return checkpoints.step_directory(0)
