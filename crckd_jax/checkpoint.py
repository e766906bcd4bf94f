"""Checkpoints of a run with orbax: the whole TrainState, the data iterator, the config.

Each checkpoint is a step folder under `<workdir>/checkpoints` holding three items:
`state` (the TrainState pytree: parameters, EMA, optimizer, memory with Z, RNG),
`data` (the grain iterator state, to continue the exact batch sequence) and `meta` (the
config and the epoch). Saves are asynchronous; orbax writes each step into a temporary
folder and renames it when complete, so a crash during a save never leaves a checkpoint
that looks finished. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp


@dataclasses.dataclass
class Restored:
    """What a checkpoint holds."""

    step: int
    state: Any
    data: dict
    meta: dict


class Checkpointer:
    """An orbax CheckpointManager for one run directory."""

    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict, meta: dict) -> None:
        """Starts an asynchronous save of `step` (device arrays are copied before return)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, target_state: Any, step: int | None = None) -> Restored:
        """The checkpoint `step` (default: latest), its state laid out like `target_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return Restored(step, restored["state"], restored["data"], restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
