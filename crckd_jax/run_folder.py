"""The folder of one run (`--workdir W`): where every file of every mode lives.

    W/run.lock                  the lock of the run writing W (`runlock`)
    W/config.json               the settings the run was started with
    W/checkpoints/<step>/       orbax checkpoints (`checkpoint.Checkpointer`), each with
                                checksums.json (its files' sizes and SHA-256)
    W/best_checkpoint/<step>/   the best validation epoch's checkpoint
    W/metrics.jsonl, W/tensorboard/, W/summary.json, W/report/
    W/export/                   `--mode export`; W/eval.json, W/eval_input.json,
                                W/predictions.csv: eval and predict
    W/fold_<k>/                 `--mode cv`: one run folder per fold, data in W

The prepared data set and folds live in `data_dir` (W itself, or the cv folder above a fold).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from crckd_jax.config import flatten
from crckd_jax.errors import ConfigChanged, ConfigError, StorageError
from crckd_jax.runlock import WorkdirLock
from crckd_jax.settings import Settings

# Keys that may differ between a run and its resumption: they change how the run is logged,
# checkpointed, read or evaluated, not what it computes. A change of any other key stops
# the resumption (`RunFolder.check_resumable`) unless the command line says
# `--allow_config_change`.
RESUME_FREE_KEYS = frozenset({
    "train.log_every_steps", "train.keep_checkpoints", "train.checkpoint_every_steps",
    "train.compilation_cache_dir", "train.eval_teacher", "train.write_report",
    "data.read_threads", "data.prefetch_batches", "data.device_prefetch", "data.worker_count",
    "data.build_threads", "data.folds",
    "predict.input", "predict.image_column", "eval.input", "eval.image_column",
    "eval.label_column", "export.teacher", "export.checkpoint", "table.rungs", "table.seeds",
})

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


class _Absent:
    """A key one of two configs lacks (as it prints in a list of changes)."""

    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


class RunFolder:
    """The paths of a run folder and the files every mode reads and writes in it."""

    def __init__(self, root: str, data_dir: str | None = None):
        self.root = root
        self.data_dir = data_dir or root

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def best_checkpoint(self) -> str:
        return self.path("best_checkpoint")

    @property
    def config_file(self) -> str:
        return self.path(CONFIG_FILE)

    @property
    def export(self) -> str:
        return self.path("export")

    @property
    def summary(self) -> str:
        """summary.json: the finished run's test metrics (`summary.summarise`); a cv fold
        with one is done."""
        return self.path(SUMMARY_FILE)

    def fold(self, k: int) -> "RunFolder":
        """The run folder of cv fold `k` (its data: this folder's)."""
        return RunFolder(self.path(f"fold_{k}"), data_dir=self.data_dir)

    def lock(self, mode: str, enabled: bool = True, shared: bool = False) -> WorkdirLock:
        """The lock held while `mode` writes this folder (`enabled`: process 0; `shared`:
        with the other processes of `--share_workdir`)."""
        return WorkdirLock(self.root, mode, enabled=enabled, shared=shared)

    def has_checkpoints(self) -> bool:
        return os.path.isdir(self.checkpoints) and any(
            p.isdigit() for p in os.listdir(self.checkpoints))

    def read_config(self) -> dict | None:
        """The settings dict of config.json, None when there is none."""
        if not os.path.exists(self.config_file):
            return None
        try:
            with open(self.config_file) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the run's config {self.config_file}: {e}") from None

    def write_config(self, settings: Settings) -> None:
        """Writes config.json atomically (a complete file or the previous one)."""
        self.write_json(CONFIG_FILE, settings.to_dict(), sort_keys=True)

    def write_json(self, name: str, value: Any, sort_keys: bool = False) -> str:
        """Writes `value` to `<root>/<name>` atomically; StorageError naming the file."""
        return self.write_text(name, json.dumps(value, indent=1, sort_keys=sort_keys) + "\n")

    def write_text(self, name: str, text: str) -> str:
        """Writes `text` to `<root>/<name>` atomically (a complete file or the previous
        one); StorageError naming the file."""
        path = self.path(name)
        return _storage(lambda: _write_atomically(path, text), path)

    def check_resumable(self, settings: Settings, allow: bool,
                        log: Callable[[str], None]) -> None:
        """`check_settings` when the folder has checkpoints (a run to resume)."""
        if self.has_checkpoints():
            self.check_settings(settings, allow, log)

    def check_settings(self, settings: Settings, allow: bool, log: Callable[[str], None],
                       going_on: str = "resuming") -> None:
        """ConfigChanged when the settings this folder's run was started with differ from
        `settings` in computation-changing keys (all but RESUME_FREE_KEYS), listing each
        key with its old and new value, or when the folder holds checkpoints but no config
        to check against; with `allow`, a warning that says what goes on (`going_on`)
        instead. The run's settings are config.json's or, without it, those stored in the
        newest readable checkpoint, with a warning. A folder with neither passes."""
        old, source = self.read_config(), self.config_file
        if old is None and self.has_checkpoints():
            from crckd_jax.checkpoint import saved_config  # orbax: only when needed

            stored = saved_config(self.checkpoints)
            if stored is not None:
                step, old = stored
                source = f"the config stored in checkpoint step {step}"
                log(f"warning: {self.config_file} is missing; the settings are checked "
                    f"against {source}")
            elif not allow:
                raise ConfigChanged(
                    f"{self.root} holds checkpoints but no {CONFIG_FILE}, and none of them "
                    "has a readable stored config, so the settings cannot be checked against "
                    "the run's: put the run's config.json back, "
                    "use a new --workdir, or pass --allow_config_change to go on with "
                    "these settings")
            else:
                log(f"warning: {going_on} without the run's {CONFIG_FILE} "
                    "(--allow_config_change)")
        if old is None:
            return
        before, after = flatten(old), flatten(settings.to_dict())
        changes = [(k, before.get(k, _ABSENT), after.get(k, _ABSENT))
                   for k in sorted(set(before) | set(after)) if k not in RESUME_FREE_KEYS
                   and before.get(k, _ABSENT) != after.get(k, _ABSENT)]
        if not changes:
            return
        listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
        if allow:
            log(f"warning: {going_on} with a changed config (--allow_config_change): "
                f"{listing}")
            return
        raise ConfigChanged(
            f"the config differs from the one this run was started with "
            f"({source}) in {len(changes)} key(s) that change the computation: "
            f"{listing}. Use the run's config, a new --workdir, or pass "
            "--allow_config_change to go on with the new values")


def _write_atomically(path: str, text: str) -> str:
    tmp = f"{path}.{os.getpid()}.tmp"  # processes sharing a workdir may write one file
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _storage(write: Callable[[], Any], path: str) -> Any:
    """`write()`, an OSError of which becomes StorageError naming `path`."""
    try:
        return write()
    except OSError as e:
        raise StorageError(f"cannot write {getattr(e, 'filename', None) or path}: "
                           f"{e.strerror or e}") from None
