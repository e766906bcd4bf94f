"""k-fold cross-validation: one training run per test fold, then a summary across folds.

Fold k trains in `<workdir>/fold_<k>/` on the data set prepared once in `<workdir>`. A fold
whose `summary.json` exists is done and is not run again; an interrupted fold resumes from
its checkpoints. `cv_summary.json` and `cv_summary.md` hold the mean and standard deviation
(population, ddof 0) of every metric across folds, for each view of `summary.summarise`.
The folds run one compiled train step (built again for each fold, found in the persistent
compilation cache): nothing fold-dependent is a constant of it (`builder.DataDescription`).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np

from crckd_jax.errors import Preempted
from crckd_jax.metrics import METRIC_KEYS
from crckd_jax.preemption import StopRequest
from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings
from crckd_jax.summary import SUMMARY_VIEWS
from crckd_jax.train import train_and_evaluate


def aggregate(summaries: dict[int, dict]) -> dict:
    """{view: {metric: {"mean", "std"}} | None, "folds": [...]} across fold summaries."""
    out = {"folds": sorted(summaries)}
    for view in SUMMARY_VIEWS:
        rows = [s[view] for s in summaries.values() if s.get(view)]
        out[view] = None if not rows else {
            k: {"mean": float(np.mean([r[k] for r in rows])),
                "std": float(np.std([r[k] for r in rows]))} for k in METRIC_KEYS}
    return out


def markdown(result: dict) -> str:
    lines = [f"# Cross-validation over folds {', '.join(map(str, result['folds']))}", ""]
    for view in SUMMARY_VIEWS:
        lines.append(f"## {view}")
        if result[view] is None:
            lines += ["", "not available (no validation split)" if view == "best_val"
                      else "not available", ""]
            continue
        lines += ["", "| metric | mean | std |", "|---|---|---|"]
        lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" for k, v in result[view].items()]
        lines.append("")
    return "\n".join(lines)


def run_cv(settings: Settings, folder: RunFolder, log: Callable[[str], None] = print,
           allow_config_change: bool = False) -> dict:
    """Trains the folds of `data.folds` in `folder.fold(k)` and writes the summary across
    them; `settings` pass `config.require_initialisation`."""
    folds = {k: (f"fold {k}", settings.with_fold(k), folder.fold(k))
             for k in settings.data.folds_to_run()}

    def summarise(summaries: dict[int, dict]) -> dict:
        result = aggregate(summaries)
        if jax.process_index() == 0:
            folder.write_json("cv_summary.json", result)
            folder.write_text("cv_summary.md", markdown(result))
            log(markdown(result))
        return result

    return run_units(folds, summarise, kind="fold", outcome="the summary across them",
                     folder=folder, log=log, allow_config_change=allow_config_change)


def run_units(units: dict, finish: Callable[[dict], dict], *, kind: str, outcome: str,
              folder: RunFolder, log: Callable[[str], None],
              allow_config_change: bool) -> dict:
    """Trains (or reads, `run_unit`) the units {key: (name, settings, folder)} in order,
    then returns `finish({key: summary})`. A signal stops before the next unit (Preempted
    naming it) or, once the last one has ended, after `finish`; `kind` ('fold', 'unit') and
    `outcome` (what `finish` writes) word the message."""
    summaries = {}
    with StopRequest() as stop:  # a signal between two runs stops before the next
        for key, (name, unit_settings, unit_folder) in units.items():
            if stop.requested():
                raise Preempted(f"stopped by {stop.signal_name} before {name}: the {kind}s "
                                "before it are done; run the same command again to go on")
            summaries[key] = run_unit(unit_settings, unit_folder, name, log,
                                      allow_config_change)
        result = finish(summaries)
    if stop.requested():
        raise Preempted(f"stopped by {stop.signal_name} after the last {kind}: every {kind} "
                        f"and {outcome} are saved in {folder.root}")
    return result


def run_unit(settings: Settings, folder: RunFolder, name: str, log: Callable[[str], None],
             allow_config_change: bool) -> dict:
    """The summary of one training run of a cross-validation or a table (`name` in the log):
    read from `folder` when its summary.json exists, else trained or resumed there."""
    done = folder.summary
    if os.path.exists(done):
        log(f"{name}: done earlier ({done})")
        with open(done) as f:
            return json.load(f)
    log(f"{name}: training in {folder.root}")
    return train_and_evaluate(settings, folder, log=log, allow_config_change=allow_config_change)
