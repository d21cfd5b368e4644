"""Checkpoints with orbax: the train state and the input pipeline's position, saved together.

    checkpoints = Checkpoints(workdir + "/checkpoints", max_to_keep=2, async_save=True)
    checkpoints.save(step, state, host_state)             # returns at once when async
    state, host_state = checkpoints.restore(step, abstract_state)

A checkpoint directory `<step>/` holds two items: "state" (the `TrainState` pytree, including
the step and the RNG key) and "host" (JSON: the data iterator's position and other host-side
progress), so a restored run sees the same batches and randomness as an uninterrupted one.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact. Restoring never deletes or rewrites
anything; a checkpoint that cannot be read raises `CheckpointError` naming the step and the
directory.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"
HOST_ITEM = "host"


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored (corrupt, incomplete, or from another config)."""


class Checkpoints:
    """An orbax `CheckpointManager` over `directory`, one checkpoint per saved step.

    max_to_keep: the newest checkpoints kept; older ones are deleted after a successful save.
    async_save: write in a background thread (`wait` blocks until writes finish).
    """

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True) -> None:
        self.directory = os.path.abspath(directory)
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
