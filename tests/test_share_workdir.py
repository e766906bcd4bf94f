"""Several processes training the units of one cv or table workdir (`--share_workdir`):
shared workdir locks, units claimed by their folders' locks, the last process writes the
summary; a unit whose process ended is taken over."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from crckd_jax import cv, errors
from crckd_jax.config import to_settings
from crckd_jax.run_folder import RunFolder
from crckd_jax.runlock import WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(num_folds=3):
    config = importlib.import_module("crckd_jax.configs.demo").get_config("tiny")
    with config.unlocked():
        config.data.num_folds = num_folds
    return config


def test_shared_holders_exclude_a_plain_run_not_each_other(tmp_path):
    first = WorkdirLock(str(tmp_path), "table", shared=True)
    second = WorkdirLock(str(tmp_path), "table", shared=True)
    with first, second:
        with pytest.raises(errors.WorkdirLocked,
                           match=r"mode table \(shared\).*add --share_workdir to join them"):
            WorkdirLock(str(tmp_path), "table").acquire()
    with WorkdirLock(str(tmp_path), "cv"):
        with pytest.raises(errors.WorkdirLocked, match=r"mode cv since") as caught:
            WorkdirLock(str(tmp_path), "cv", shared=True).acquire()
        assert "--share_workdir" not in str(caught.value)
    with WorkdirLock(str(tmp_path), "cv"):  # every holder gone: free again
        pass


def fake_training(trained: list):
    """`train_folds` that records the folds and writes each one's summary.json."""

    def train_folds(runs, log, allow_config_change):
        summaries = []
        for settings, folder in runs:
            trained.append(settings.data.fold)
            summary = {view: None for view in ("final", "mean_last_11", "best_val")}
            os.makedirs(folder.root, exist_ok=True)
            folder.write_json("summary.json", summary)
            summaries.append(summary)
        return summaries

    return train_folds


def test_a_unit_another_process_holds_is_left_to_it_and_the_last_writes_the_summary(
        tmp_path, monkeypatch):
    """Fold 1's folder held by another process: a sharing process trains folds 0 and 2,
    names fold 1 and its holder, writes no summary and returns None; once fold 1's holder is
    gone (ended unfinished), the next sharing process trains fold 1 and writes the summary.
    A process that does not share fails on the held fold, naming its folder."""
    trained, logs = [], []
    monkeypatch.setattr(cv, "train_folds", fake_training(trained))
    settings, folder = to_settings(tiny_config()), RunFolder(str(tmp_path))
    other = WorkdirLock(folder.fold(1).root, "train")
    with other:
        assert cv.run_cv(settings, folder, log=logs.append, share=True) is None
        assert trained == [0, 2] and not (tmp_path / "cv_summary.json").exists()
        assert any(line.startswith("1 fold(s) are being trained by other processes: fold 1 "
                                   "(host ") and f"pid {os.getpid()} mode train" in line
                   and "the last process to finish writes the summary across them" in line
                   for line in logs), logs
        with pytest.raises(errors.WorkdirLocked, match=rf"workdir {folder.fold(1).root} is in "
                                                       "use by another run"):
            cv.run_cv(settings, folder, log=logs.append)
    result = cv.run_cv(settings, folder, log=logs.append, share=True)
    assert trained == [0, 2, 1] and result["folds"] == [0, 1, 2]
    assert json.loads((tmp_path / "cv_summary.json").read_text())["folds"] == [0, 1, 2]


def test_a_unit_freed_during_the_pass_is_trained_in_a_second_pass(tmp_path, monkeypatch):
    """The holder of fold 0 ends while this process trains fold 1: fold 0 is trained in a
    second pass over the units, and the summary is written."""
    trained = []
    train = fake_training(trained)
    other = WorkdirLock(RunFolder(str(tmp_path)).fold(0).root, "train")
    other.acquire()

    def train_and_free(runs, log, allow_config_change):
        other.release()  # the other process ends, fold 0 unfinished
        return train(runs, log, allow_config_change)

    monkeypatch.setattr(cv, "train_folds", train_and_free)
    result = cv.run_cv(to_settings(tiny_config(num_folds=2)), RunFolder(str(tmp_path)),
                       log=lambda _: None, share=True)
    assert trained == [1, 0] and result["folds"] == [0, 1]


def _started_elsewhere(folder: RunFolder, fold: int, settings, finished: bool) -> None:
    """Fold `fold`'s folder as another run left it: its config.json, and its summary.json
    when `finished`."""
    unit = folder.fold(fold)
    os.makedirs(unit.root, exist_ok=True)
    unit.write_config(settings.with_fold(fold))
    if finished:
        unit.write_json("summary.json", {v: None for v in ("final", "mean_last_11",
                                                           "best_val")})


def test_a_unit_started_with_other_settings_is_neither_reused_nor_waited_for(
        tmp_path, monkeypatch):
    """Fold 0 finished and fold 1 held by a run started with another max_lr (their
    config.json): the cv stops at fold 0, or with only fold 1 at fold 1, with ConfigChanged
    naming the unit's config and the key, before training anything; with
    allow_config_change, fold 0 is reused and fold 1 left to its holder, each with one
    warning. A single process run again on the workdir stops the same way."""
    trained, logs = [], []
    monkeypatch.setattr(cv, "train_folds", fake_training(trained))
    settings, folder = to_settings(tiny_config()), RunFolder(str(tmp_path))
    config = tiny_config()
    with config.unlocked():
        config.optim.max_lr = 2 * settings.optim.max_lr
    elsewhere = to_settings(config)
    _started_elsewhere(folder, 1, elsewhere, finished=False)
    with WorkdirLock(folder.fold(1).root, "train"):
        with pytest.raises(errors.ConfigChanged,
                           match=rf"\({folder.fold(1).config_file}\) in 1 key\(s\).*optim.max_lr"):
            cv.run_cv(settings, folder, log=logs.append, share=True)
        assert trained == []
        _started_elsewhere(folder, 0, elsewhere, finished=True)
        with pytest.raises(errors.ConfigChanged, match=rf"\({folder.fold(0).config_file}\)"):
            cv.run_cv(settings, folder, log=logs.append, share=True)
        assert trained == []
        assert cv.run_cv(settings, folder, log=logs.append, share=True,
                         allow_config_change=True) is None
    assert trained == [2]
    with pytest.raises(errors.ConfigChanged, match=rf"\({folder.fold(0).config_file}\)"):
        cv.run_cv(settings, folder, log=logs.append)  # one process, run again: the same
    warnings = [line for line in logs if line.startswith("warning:")]
    assert [w.split(" (--allow")[0] for w in warnings] == [
        "warning: reusing fold 0 with a changed config",
        "warning: leaving fold 1 to its holder with a changed config"]


def test_share_workdir_is_refused_outside_cv_and_table(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--config", "demo:tiny", "--workdir",
         str(tmp_path), "--mode", "train", "--share_workdir"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == errors.EXIT_CONFIG, done.stderr
    assert done.stderr == ("error: --share_workdir applies to --mode cv and --mode table, "
                           "not --mode train\n")


def test_two_processes_share_a_cv_each_fold_trained_once(tmp_path):
    """Two launch.py processes started together on one cv workdir with --share_workdir:
    both end with status 0, the data set is prepared once, every fold is trained by
    exactly one of them (one run of steps in its metrics), and the summary across the folds
    is written."""
    command = [sys.executable, str(ROOT / "launch.py"), "--config", "demo:tiny", "--workdir",
               str(tmp_path), "--mode", "cv", "--share_workdir",
               "--config.data.num_folds=3", "--config.train.epochs=1",
               "--config.train.steps_per_epoch=2", "--config.train.log_every_steps=1",
               "--config.train.write_report=false"]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    text = "".join(out for out, _ in outputs)
    for k in range(3):
        assert text.count(f"fold {k}: training in {tmp_path / f'fold_{k}'}") == 1, text
        records = [json.loads(line) for line in
                   (tmp_path / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert text.count("preparing the data set:") == 1, text
    assert json.loads((tmp_path / "cv_summary.json").read_text())["folds"] == [0, 1, 2]
