"""Folds of one rung trained side by side (`parallel.folds_side_by_side`, `train.train_folds`)
on `configs/demo.py:tiny`: each fold as if trained alone (within float32 rounding), an
exact resume after a stop, and a fold left one checkpoint ahead brought back to the
others."""

import json
import os
import pathlib
import signal

import jax
import numpy as np
import pytest

from crckd_jax import cv, train
from crckd_jax.checkpoint import Checkpointer
from crckd_jax.configs import demo
from crckd_jax.config import to_settings
from crckd_jax.errors import Preempted
from crckd_jax.logger import read_records
from crckd_jax.objective import LOSS_KEYS
from crckd_jax.run_folder import RunFolder
from crckd_jax.trainer import load_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDS = (0, 1)


def tiny_settings(side_by_side: int, **train_keys):
    """The tiny demo, 2 folds, 2 epochs of 5 steps, every step logged."""
    config = demo.get_config("tiny")
    with config.unlocked():
        config.data.num_folds = 2
        config.parallel.folds_side_by_side = side_by_side
        config.train.update({"steps_per_epoch": 5, "epochs": 2, "log_every_steps": 1,
                             "checkpoint_every_steps": 0, "write_report": False,
                             **train_keys})
    return to_settings(config)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    load_data(tiny_settings(1), str(path), log=lambda _: None)
    return str(path)


def runs(settings, root, data_dir):
    return [(settings.with_fold(k), RunFolder(str(root / f"fold_{k}"), data_dir))
            for k in FOLDS]


def final_state(folder: pathlib.Path):
    checkpoints = Checkpointer(str(folder / "checkpoints"), read_only=True)
    step = checkpoints.latest_step()
    state = jax.device_get(checkpoints.restore(checkpoints.single_device_target()).state)
    checkpoints.close()
    return step, {jax.tree_util.keystr(p): np.asarray(leaf)
                  for p, leaf in jax.tree_util.tree_leaves_with_path(state)}


def train_losses(folder: pathlib.Path):
    return [r for r in read_records(str(folder / "metrics.jsonl")) if r["split"] == "train"]


@pytest.fixture(scope="module")
def alone_and_together(tmp_path_factory, data_dir):
    """Both folds trained one after the other (`--mode cv`'s default) and side by side."""
    root = tmp_path_factory.mktemp("folds")
    for side_by_side in (1, 2):
        settings = tiny_settings(side_by_side)
        cv.run_cv(settings, RunFolder(str(root / f"by_{side_by_side}"), data_dir),
                  log=lambda _: None)
    return root / "by_1", root / "by_2"


@pytest.mark.parametrize("fold", FOLDS)
def test_a_fold_trained_side_by_side_is_the_fold_trained_alone(alone_and_together, fold):
    """The same computation in one program over a stacked fold axis: XLA's CPU backend
    compiles the batched convolutions and reductions with another summation order, so the
    two agree to float32 rounding, not bit for bit. The 10 steps' losses within rtol 1e-5
    (the parity tolerance); the parameters after them where their values are not near 0
    (relative 1e-3: Adam's first steps divide by the root of tiny second moments, which
    turns rounding in a gradient into visible steps of a few parameters)."""
    alone, together = (root / f"fold_{fold}" for root in alone_and_together)
    a, b = train_losses(alone), train_losses(together)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for key in (*LOSS_KEYS, "learning_rate"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {ra['step']} {key}")
    (step_a, state_a), (step_b, state_b) = final_state(alone), final_state(together)
    assert step_a == step_b == 10 and state_a.keys() == state_b.keys() and len(state_a) > 100
    for key in state_a:
        if state_a[key].dtype.kind != "f":  # steps, labels, memory positions, RNG
            np.testing.assert_array_equal(state_b[key], state_a[key], err_msg=key)
            continue
        big = np.abs(state_a[key]) > 1e-2
        np.testing.assert_allclose(state_b[key][big], state_a[key][big], rtol=1e-3,
                                   err_msg=key)
    summary_a, summary_b = (json.loads((p / "summary.json").read_text())
                            for p in (alone, together))
    assert summary_a.keys() == summary_b.keys() and summary_b["final"]
    assert (alone.parent / "cv_summary.json").is_file()
    assert (together.parent / "cv_summary.json").is_file()


def stop_at_step(monkeypatch, n: int) -> None:
    """SIGTERM to this process during the n-th step of the side-by-side loop."""
    advance = train._Lanes.advance
    calls = []

    def advancing(self, state):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return advance(self, state)

    monkeypatch.setattr(train._Lanes, "advance", advancing)


def test_side_by_side_resumes_exactly_even_with_a_fold_a_checkpoint_ahead(
        alone_and_together, data_dir, tmp_path, monkeypatch):
    """SIGTERM in step 3 saves both folds' step 3 and stops; fold 0's step 3 is then
    removed (as if killed between the two folds' saves), so fold 1 is a checkpoint ahead:
    the resumed call moves fold 1's step 3 aside, goes on from step 2 for both, and ends
    with the states and records of the uninterrupted side-by-side run."""
    settings = tiny_settings(2, checkpoint_every_steps=1)
    stop_at_step(monkeypatch, 3)
    with pytest.raises(Preempted, match=r"after step 3 of 10: checkpoint step 3 saved in "):
        train.train_folds(runs(settings, tmp_path, data_dir), log=lambda _: None)
    monkeypatch.undo()
    saved = {k: Checkpointer(str(tmp_path / f"fold_{k}" / "checkpoints"), read_only=True)
             for k in FOLDS}
    assert [saved[k].manager.all_steps() for k in FOLDS] == [[1, 2, 3]] * 2
    for checkpoints in saved.values():
        checkpoints.close()
    import shutil

    shutil.rmtree(tmp_path / "fold_0" / "checkpoints" / "3")
    logs = []
    train.train_folds(runs(settings, tmp_path, data_dir), log=logs.append)
    text = "\n".join(logs)
    assert "checkpoint step 3 of " in text and "going on from step 2" in text, text
    assert "fold 0: resumed from step 2" in text and "fold 1: resumed from step 2" in text
    moved = list((tmp_path / "fold_1" / "damaged_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["3"]
    uninterrupted = alone_and_together[1]
    for k in FOLDS:
        (step_a, a), (step_b, b) = (final_state(uninterrupted / f"fold_{k}"),
                                    final_state(tmp_path / f"fold_{k}"))
        assert step_a == step_b == 10 and a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=f"fold {k} {key}")
        want, got = (train_losses(p / f"fold_{k}") for p in (uninterrupted, tmp_path))
        assert [r["step"] for r in got] == list(range(1, 11))  # none twice, none missing
        for ra, rb in zip(want, got):
            assert {key: v for key, v in ra.items() if key not in ("images_per_s",
                                                                   "process_cpu_s")} == \
                {key: v for key, v in rb.items() if key not in ("images_per_s",
                                                                "process_cpu_s")}


def test_units_are_grouped_by_rung_up_to_the_setting(tmp_path):
    """`--mode table` (and cv): the units left to train go side by side when their settings
    differ only in the fold, `parallel.folds_side_by_side` at a time; a done unit is read."""
    from crckd_jax import table

    settings = tiny_settings(2)
    settings = settings.__class__.from_dict({
        **settings.to_dict(), "table": {"rungs": "baseline,crckd", "seeds": ""},
        "data": {**settings.to_dict()["data"], "num_folds": 3}})
    folder = RunFolder(str(tmp_path))
    units = {unit: (f"{unit.rung} fold {unit.fold}", unit.settings(settings),
                    unit.folder(folder)) for unit in table.units(settings)}
    done = [u for u in units if u.rung == "baseline" and u.fold == 1][0]
    os.makedirs(units[done][2].root)
    pathlib.Path(units[done][2].summary).write_text('{"final": null}')
    summaries, busy, logs = {}, {}, []
    groups = []
    for group, locks in cv._groups(units, summaries, busy, logs.append, share=False,
                                   allow_config_change=False):
        groups.append([(u.rung, u.fold) for u in group])
        assert [lock.path for lock in locks] == [
            os.path.join(units[u][2].root, "run.lock") for u in group]
        for lock in locks:
            lock.release()
    assert groups == [[("baseline", 0), ("baseline", 2)], [("crckd", 0), ("crckd", 1)],
                      [("crckd", 2)]]
    assert summaries == {done: {"final": None}} and "baseline fold 1: done earlier" in logs[0]
    assert not busy


def test_cv_side_by_side_compiles_one_stacked_step(tmp_path):
    """`--mode cv` with 2 folds of 3 side by side (93 and 94 training items: the bank
    memory padded to the larger) compiles one stacked train step and no single-fold one
    (counted in the run's own persistent compilation cache)."""
    import subprocess
    import sys

    cache = tmp_path / "xla"
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--config",
         str(ROOT / "configs" / "demo.py") + ":tiny", "--workdir", str(tmp_path / "w"),
         "--mode", "cv", "--config.data.num_folds=3", "--config.data.folds=0,2",
         "--config.memory.kind=bank", "--config.parallel.folds_side_by_side=2",
         "--config.train.write_report=false", f"--config.train.compilation_cache_dir={cache}"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "fold 0 and fold 2: training in" in done.stdout and "(side by side)" in done.stdout
    assert len(list(cache.glob("jit_train_side_by_side-*"))) == 1
    assert not list(cache.glob("jit_train_with_lr-*"))
    for k in (0, 2):
        config = json.loads((tmp_path / "w" / f"fold_{k}" / "config.json").read_text())
        assert config["parallel"]["folds_side_by_side"] == 2 and config["data"]["fold"] == k
    assert json.loads((tmp_path / "w" / "cv_summary.json").read_text())["folds"] == [0, 2]


def test_folds_of_different_epoch_lengths_train_in_groups_of_equal_length():
    """Folds whose training parts give different steps per epoch cannot share a step: they
    form groups of equal length, in order, and the log says so."""
    from types import SimpleNamespace

    def fold(name, per_epoch):
        run = SimpleNamespace(steps_per_epoch=per_epoch, total_steps=2 * per_epoch)
        return SimpleNamespace(name=name, trainer=SimpleNamespace(run=run))

    folds = [fold("fold 0", 46), fold("fold 1", 45), fold("fold 2", 46)]
    logs = []
    groups = train._equal_length_groups(folds, logs.append)
    assert [[f.name for f in group] for group in groups] == [["fold 0", "fold 2"], ["fold 1"]]
    assert logs == ["the folds differ in steps per epoch, so they train in groups of equal "
                    "length: fold 0, fold 2: 46 steps per epoch; fold 1: 45 steps per epoch"]
    assert train._equal_length_groups(folds[::2], logs.append) == [folds[::2]]
    assert len(logs) == 1


FOLD_GROUP_COLLECTIVES = """
import collections, importlib, json, re, jax
from crckd_jax import builder
from crckd_jax.config import to_settings
config = importlib.import_module("crckd_jax.configs.demo").get_config("tiny")
counts = {}
for groups in (1, 2):
    with config.unlocked():
        config.parallel.folds_side_by_side = 2
        config.parallel.fold_axis_size = groups
        config.train.batch_size = 8
    run = builder.build_run(to_settings(config),
                            builder.DataDescription.from_counts([10, 8, 6, 5, 4, 4, 3]))
    state, batch, weight = run.abstract_train_inputs()
    layout = run.parallel.fold_sharding(2)
    stacked = lambda x: jax.ShapeDtypeStruct((2, *x.shape), x.dtype,
                                             sharding=layout or x.sharding)
    states, weights = jax.tree.map(stacked, (state, weight))
    text = run.folds_train_step.lower(states, (batch, batch), weights).compile().as_text()
    counts[groups] = collections.Counter(re.findall(
        r"\\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
        r"(?:-start)?\\(", text))
print(json.dumps(counts))
"""


def test_folds_split_over_fold_groups_of_one_device_exchange_nothing():
    """`parallel.fold_axis_size=2` on 2 devices: each device trains its own fold, and the
    compiled step of the 2 folds has no collective at all (neither gradients nor batches
    cross devices); without fold groups the same 2 folds all-reduce their gradients."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-c", FOLD_GROUP_COLLECTIVES], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.splitlines()[-1])
    assert counts["2"] == {}, counts
    assert counts["1"].get("all-reduce", 0) >= 1, counts


@pytest.mark.slow
def test_side_by_side_on_two_devices_equals_one_device(tmp_path):
    """2 folds side by side on 2 fake CPU devices (shard_map, pmap, and the 2 folds split
    over 2 fold groups of one device; BatchNorm statistics synchronised) against the same
    on 1 device, 3 steps: losses within rtol 1e-5 and the parameters within the 1-vs-N
    tolerance of tests/test_parallel.py (1e-3 of max(max |b|, 1e-2) per leaf)."""
    import subprocess
    import sys

    def cv_run(name, devices, backend, *flags):
        env = dict(os.environ,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        done = subprocess.run(
            [sys.executable, str(ROOT / "launch.py"), "--config",
             str(ROOT / "configs" / "demo.py") + ":tiny", "--workdir", str(tmp_path / name),
             "--mode", "cv", "--config.data.num_folds=2",
             "--config.parallel.folds_side_by_side=2", f"--config.parallel.backend={backend}",
             "--config.parallel.sync_batch_norm=true", "--config.train.batch_size=8",
             "--config.train.epochs=1", "--config.train.steps_per_epoch=3",
             "--config.train.log_every_steps=1", "--config.train.write_report=false",
             *flags],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        return tmp_path / name

    one = cv_run("one", 1, "shard_map")
    for name, backend, *flags in (("two_shard_map", "shard_map"), ("two_pmap", "pmap"),
                                  ("two_fold_groups", "shard_map",
                                   "--config.parallel.fold_axis_size=2")):
        two = cv_run(name, 2, backend, *flags)
        for k in FOLDS:
            for ra, rb in zip(train_losses(one / f"fold_{k}"), train_losses(two / f"fold_{k}")):
                for key in LOSS_KEYS:
                    np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-7)
            (_, a), (_, b) = final_state(one / f"fold_{k}"), final_state(two / f"fold_{k}")
            for key in a:
                if "params" in key:
                    scale = max(np.abs(a[key]).max(initial=0), 1e-2)
                    assert np.abs(b[key] - a[key]).max(initial=0) <= 1e-3 * scale, (name, k,
                                                                                     key)
