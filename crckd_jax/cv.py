"""k-fold cross-validation: one training run per test fold, then a summary across folds.

Fold k trains in `<workdir>/fold_<k>/` on the data set prepared once in `<workdir>`. A fold
whose `summary.json` exists is done and is not run again; an interrupted fold resumes from
its checkpoints. `cv_summary.json` and `cv_summary.md` hold the mean and standard deviation
(population, ddof 0) of every metric across the folds where it is finite, and their number,
for each view of `summary.summarise` (`summary.mean_std`).
The folds run one compiled train step (built again for each fold, found in the persistent
compilation cache): nothing fold-dependent is a constant of it (`builder.DataDescription`).
With `parallel.folds_side_by_side=K`, K folds at a time train as one program
(`train.train_folds`).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax

from crckd_jax.errors import Preempted
from crckd_jax.metrics import METRIC_KEYS
from crckd_jax.preemption import StopRequest
from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings
from crckd_jax.summary import SUMMARY_VIEWS, mean_std
from crckd_jax.train import train_folds


def aggregate(summaries: dict[int, dict]) -> dict:
    """{view: {metric: {"mean", "std", "n"}} | None, "folds": [...]} across fold summaries
    (`summary.mean_std`)."""
    out = {"folds": sorted(summaries)}
    for view in SUMMARY_VIEWS:
        rows = [s[view] for s in summaries.values() if s.get(view)]
        out[view] = None if not rows else {k: mean_std([r[k] for r in rows])
                                           for k in METRIC_KEYS}
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
        for k, v in result[view].items():
            lines.append(f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" if v["n"]
                         else f"| {k} | n/a | n/a |")
        lines.append("")
    return "\n".join(lines)


def run_cv(settings: Settings, folder: RunFolder, log: Callable[[str], None] = print,
           allow_config_change: bool = False, share: bool = False) -> dict | None:
    """Trains the folds of `data.folds` in `folder.fold(k)` and writes the summary across
    them; `settings` pass `config.require_initialisation`. `share`: with other processes
    (`run_units`; None when another process is left to write the summary)."""
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
                     folder=folder, log=log, allow_config_change=allow_config_change,
                     share=share)


def run_units(units: dict, finish: Callable[[dict], dict], *, kind: str, outcome: str,
              folder: RunFolder, log: Callable[[str], None],
              allow_config_change: bool, share: bool = False) -> dict | None:
    """Trains (or reads, when its summary.json exists) the units {key: (name, settings,
    folder)} in order, then returns `finish({key: summary})`. Units left to train whose
    settings differ only in the fold train side by side, `parallel.folds_side_by_side` at a
    time (`train.train_folds`). A signal stops before the next group (Preempted naming its
    first unit) or, once the last one has ended, after `finish`; `kind` ('fold', 'unit')
    and `outcome` (what `finish` writes) word the message.

    A unit is trained under its folder's lock (`runlock`). With `share` (several processes
    on one workdir, `--share_workdir`) a unit another process holds is left to it: this
    process trains the others, again while a pass over the units finds one to train (a
    unit whose process ended unfinished is taken over and resumes), and calls `finish`
    only when every unit is done (the last process to finish writes `outcome`); else it
    returns None. Without `share` a held unit is an error (WorkdirLocked)."""
    summaries = {}
    with StopRequest() as stop:  # a signal between two groups stops before the next
        busy = {}
        while True:
            trained = False
            for group, locks in _groups(units, summaries, busy, log, share,
                                        allow_config_change):
                try:
                    name = units[group[0]][0]
                    if stop.requested():
                        raise Preempted(f"stopped by {stop.signal_name} before {name}: the "
                                        f"{kind}s before it are done; run the same command "
                                        "again to go on")
                    names = " and ".join(units[key][0] for key in group)
                    where = ", ".join(units[key][2].root for key in group)
                    log(f"{names}: training in {where}" + (" (side by side)" if len(group) > 1
                                                           else ""))
                    summaries.update(zip(group, train_folds(
                        [units[key][1:] for key in group], log=log,
                        allow_config_change=allow_config_change)))
                    trained = True
                finally:
                    for lock in locks:
                        lock.release()
            if not busy or not trained:
                break
        if busy:
            log(f"{len(busy)} {kind}(s) are being trained by other processes: "
                + "; ".join(f"{units[key][0]} ({holder})" for key, holder in busy.items())
                + f". This process is done; the last process to finish writes {outcome} in "
                f"{folder.root}")
            return None
        result = finish({key: summaries[key] for key in units})
    if stop.requested():
        raise Preempted(f"stopped by {stop.signal_name} after the last {kind}: every {kind} "
                        f"and {outcome} are saved in {folder.root}")
    return result


def _groups(units: dict, summaries: dict, busy: dict, log: Callable[[str], None],
            share: bool, allow_config_change: bool):
    """The units left to train, in groups trained side by side, each with the locks of its
    units' folders (held; the caller releases them): consecutive units whose settings are
    equal but for the fold, up to `parallel.folds_side_by_side` of them. A unit whose
    summary.json exists is read into `summaries` instead; one whose folder another process
    holds is put in `busy` {key: holder} (`share`) or raises WorkdirLocked. A finished or
    held unit started with other settings (its config.json) raises ConfigChanged, or with
    `allow_config_change` is taken as it is, with a warning: a summary is not reused, nor
    another process's unit waited for, under settings it was not trained with."""
    group, locks, program, lock = [], [], None, None
    checked = set(busy)  # the units held in the last pass, their settings checked then
    busy.clear()
    try:
        for key, (name, settings, unit_folder) in units.items():
            if key in summaries:
                continue
            lock = unit_folder.lock("train", enabled=jax.process_index() == 0)
            if share:
                holder = lock.try_acquire()
                if holder is not None:
                    if key not in checked:
                        unit_folder.check_settings(settings, allow_config_change, log,
                                                   going_on=f"leaving {name} to its holder")
                    busy[key] = holder
                    continue
            else:
                lock.acquire()
            done = unit_folder.summary
            if os.path.exists(done):  # also one another process finished while we looked
                unit_folder.check_settings(settings, allow_config_change, log,
                                           going_on=f"reusing {name}")
                lock.release()
                log(f"{name}: done earlier ({done})")
                with open(done) as f:
                    summaries[key] = json.load(f)
                continue
            same = settings.with_fold(0)
            if group and (same != program
                          or len(group) == settings.parallel.folds_side_by_side):
                yield group, locks
                group, locks = [], []
            group.append(key)
            locks.append(lock)
            program, lock = same, None
        if group:
            yield group, locks
    finally:  # units claimed but not handed out (the caller failed): their locks go
        for claimed in filter(None, [*locks, lock]):
            claimed.release()
