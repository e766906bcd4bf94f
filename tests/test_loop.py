"""The training loop in-process on `configs/demo.py:tiny`: one compile of the train step,
metrics read only at log points and before checkpoints, the deferred non-finite guard, the
clean stop on SIGTERM."""

import importlib.util
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crckd_jax import train
from crckd_jax.checkpoint import Checkpointer
from crckd_jax.errors import Preempted
from crckd_jax.preemption import StopRequest
from crckd_jax.logger import MetricLogger, read_records
from crckd_jax.parallel import DataParallel
from crckd_jax.config import to_settings
from crckd_jax.run_folder import RunFolder
from crckd_jax.trainer import build_trainer, load_data

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**train_keys):
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    with config.unlocked():
        config.train.steps_per_epoch = 4
        config.train.epochs = 2
        config.train.log_every_steps = 3
        config.train.checkpoint_every_steps = 0
        for key, value in train_keys.items():
            config.train[key] = value
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    load_data(to_settings(tiny_config()), str(path), log=lambda _: None)
    return str(path)


def count_traces(monkeypatch) -> list[str]:
    """Records the name of every function `DataParallel.compile` traces (a trace of an
    already compiled step would mean a second compile)."""
    traced = []
    original = DataParallel.compile

    def compile_counting(self, step_fn, **kwargs):
        def counted(*args):
            traced.append(getattr(step_fn, "__name__", None) or step_fn.func.__name__)
            return step_fn(*args)
        return original(self, counted, **kwargs)

    monkeypatch.setattr(DataParallel, "compile", compile_counting)
    return traced


def run_loop(config, data_dir, workdir, monkeypatch, wrap_step=None, stop=None):
    """Runs `_train_loop` from step 0; returns the trainer, the sizes of the metric reads,
    and the checkpointer."""
    trainer = build_trainer(to_settings(config), data_dir, log=lambda _: None)
    if wrap_step is not None:
        trainer.run.train_step = wrap_step(trainer.run.train_step)
    reads = []
    check = train._check_finite
    monkeypatch.setattr(train, "_check_finite",
                        lambda lanes, pending: reads.append([s for s, _ in pending])
                        or check(lanes, pending))
    checkpoints = Checkpointer(str(workdir / "checkpoints"), asynchronous=False)
    fold = train._Fold("", trainer.run.settings, RunFolder(str(workdir), data_dir), trainer,
                       checkpoints, None, logger=MetricLogger(str(workdir)),
                       batches=trainer.train_batches())
    try:
        lanes = train._Lanes([fold])
        train._train_loop(lanes, lanes.initial_state(), 0, stop)
    finally:
        fold.batches.close()
        fold.logger.close()
        checkpoints.close()
    return trainer, reads, checkpoints


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_one_compile_and_metrics_read_at_log_points_and_epoch_ends(
        data_dir, tmp_path, monkeypatch, backend):
    config = tiny_config()
    with config.unlocked():
        config.parallel.backend = backend
    traced = count_traces(monkeypatch)
    trainer, reads, _ = run_loop(config, data_dir, tmp_path, monkeypatch)
    # 8 train steps and 2 evaluations of 3 batches: each step traced (compiled) once, as the
    # state put on the devices has exactly the layout the step returns.
    assert sorted(traced) == ["eval_fn", "train_with_lr"]
    # log every 3 steps, epochs of 4: reads after steps 3, 4 (epoch end), 6, 8.
    assert reads == [[1, 2, 3], [4], [5, 6], [7, 8]]
    train_records = [r for r in read_records(str(tmp_path / "metrics.jsonl"))
                     if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [3, 4, 6, 8]
    cpu = [r["process_cpu_s"] for r in train_records]
    assert cpu == sorted(cpu) and cpu[0] > 0


def test_non_finite_loss_between_reads_stops_before_the_next_checkpoint(
        data_dir, tmp_path, monkeypatch):
    config = tiny_config(checkpoint_every_steps=2, log_every_steps=5)

    def poison_step_3(step_fn):
        calls = []

        def poisoned(state, batch, class_weight):
            state, metrics = step_fn(state, batch, class_weight)
            calls.append(1)
            if len(calls) == 3:
                metrics = {**metrics, "crp": metrics["crp"] * jnp.nan}
            return state, metrics
        return poisoned

    with pytest.raises(train.TrainingDiverged, match=r"non-finite loss at step 3 .*crp=nan"
                       r".*last good checkpoint is step 2"):
        run_loop(config, data_dir, tmp_path, monkeypatch, wrap_step=poison_step_3)
    # Step 4 (a checkpoint step) was reached on the host but not saved.
    assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2


def test_prefetch_keeps_each_batch_with_the_iterator_state_after_it(data_dir):
    trainer = build_trainer(to_settings(tiny_config()), data_dir, log=lambda _: None)
    plain = iter(trainer.train_dataset())
    expected = []
    for _ in range(5):
        batch = next(plain)
        expected.append((batch["index"], plain.get_state()))
    ahead = trainer.run.parallel.prefetch(trainer.train_dataset(), 2)
    for index, state in expected:
        device_batch = next(ahead)
        time.sleep(0.05)  # the thread reads ahead meanwhile
        assert isinstance(device_batch["image"], jax.Array)
        assert (jax.device_get(device_batch["index"]) == index).all()
        assert ahead.get_state() == state
    # Restored to a state, it continues from the batch after it.
    resumed = trainer.run.parallel.prefetch(trainer.train_dataset(), 2)
    resumed.set_state(expected[2][1])
    np.testing.assert_array_equal(jax.device_get(next(resumed)["index"]), expected[3][0])
    ahead.close(), resumed.close()


def sigterm_in_step(n: int):
    """A `run_loop` step wrapper that sends this process SIGTERM during the n-th step."""
    def wrap(step_fn):
        calls = []

        def step(state, batch, class_weight):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch, class_weight)
        return step
    return wrap


def test_sigterm_stops_after_the_current_step_with_its_checkpoint(data_dir, tmp_path,
                                                                  monkeypatch):
    """SIGTERM during step 2 (mid-epoch, between log points): the pending metrics are checked,
    step 2 is saved with the iterator state after its batch, then Preempted."""
    before = signal.getsignal(signal.SIGTERM)
    reads = []
    check = train._check_finite
    with pytest.raises(Preempted, match=r"stopped by SIGTERM after step 2 of 8: checkpoint "
                                        r"step 2 saved in .*run the same command again"):
        with StopRequest() as stop:
            monkeypatch.setattr(train, "_check_finite", lambda lanes, p: reads.append(
                [s for s, _ in p]) or check(lanes, p))
            run_loop(tiny_config(), data_dir, tmp_path, monkeypatch,
                     wrap_step=sigterm_in_step(2), stop=stop)
    assert signal.getsignal(signal.SIGTERM) is before
    assert reads[-1] == [1, 2]
    checkpoints = Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpoints.manager.all_steps() == [2]
    saved = checkpoints.manager.restore(2, args=ocp_args())["data"]
    plain = iter(build_trainer(to_settings(tiny_config()), data_dir,
                               log=lambda _: None).train_dataset())
    next(plain), next(plain)
    assert saved == plain.get_state()



def test_sigterm_in_the_last_step_is_honoured(data_dir, tmp_path, monkeypatch):
    """SIGTERM during the run's last step: its (epoch-end) checkpoint is committed and the run
    stops with Preempted instead of going on to its report."""
    with pytest.raises(Preempted, match=r"after step 8 of 8: checkpoint step 8 saved .*"
                                        r"evaluates and reports the finished run"):
        with StopRequest() as stop:
            run_loop(tiny_config(), data_dir, tmp_path, monkeypatch,
                     wrap_step=sigterm_in_step(8), stop=stop)
    assert Checkpointer(str(tmp_path / "checkpoints")).manager.all_steps() == [4, 8]


def test_a_signal_between_cv_folds_stops_before_the_next(tmp_path, monkeypatch):
    """`--mode cv`: SIGTERM arriving outside a fold's training loop (here: as fold 0 ends)
    ends the cross-validation with Preempted before fold 1 starts."""
    from crckd_jax import cv

    trained = []

    def fold_run(runs, log, allow_config_change):
        trained.extend(settings.data.fold for settings, _ in runs)
        os.kill(os.getpid(), signal.SIGTERM)
        return [{}] * len(runs)

    monkeypatch.setattr(cv, "train_folds", fold_run)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=r"stopped by SIGTERM before fold 1: the folds before "):
        cv.run_cv(to_settings(tiny_config()), RunFolder(str(tmp_path)), log=lambda _: None)
    assert trained == [0] and signal.getsignal(signal.SIGTERM) is before


def test_a_signal_between_table_units_stops_before_the_next(tmp_path, monkeypatch):
    """`--mode table`: SIGTERM as a unit ends stops the table with Preempted before the next
    unit; no table file is written."""
    from crckd_jax import cv

    trained = []

    def unit_run(runs, log, allow_config_change):
        trained.extend((settings.loss.ccd_weight, settings.data.fold) for settings, _ in runs)
        os.kill(os.getpid(), signal.SIGTERM)
        return [{}] * len(runs)

    monkeypatch.setattr(cv, "train_folds", unit_run)
    from crckd_jax import table

    config = tiny_config()
    with config.unlocked():
        config.table.rungs, config.data.num_folds = "baseline,crckd", 2

    with pytest.raises(Preempted, match=r"stopped by SIGTERM before baseline seed \d+ fold 1: "):
        table.run_table(to_settings(config), RunFolder(str(tmp_path)), log=lambda _: None)
    assert trained == [(0.0, 0)] and not (tmp_path / "table.json").exists()


class SyncPoints:
    """JAX's preemption sync manager as one of several processes sees it: its questions
    are numbered (each one more than the last); once a notice arrives, the point agreed by
    all is the number after the highest asked (here: this process's last)."""

    def __init__(self):
        self.asked, self.point = [], None

    def notice(self):
        self.point = (self.asked[-1] if self.asked else 0) + 1

    def __call__(self, number: int) -> bool:
        assert not self.asked or number == self.asked[-1] + 1, (self.asked, number)
        self.asked.append(number)
        return number == self.point


def test_several_processes_stop_together_at_the_boundary_after_a_late_notice(
        tmp_path, monkeypatch):
    """Several processes: a preemption notice arriving after a fold's last step (during its
    evaluation) is agreed at the next boundary, before fold 1, by every process alike; the
    questions of the fold's loop and of the boundaries are numbered together, as JAX's
    sync manager requires."""
    from jax.experimental import multihost_utils

    from crckd_jax import cv, preemption

    points = SyncPoints()
    monkeypatch.setattr(preemption, "_agreed_across_processes", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", points)
    trained = []

    def fold_run(runs, log, allow_config_change):
        trained.extend(settings.data.fold for settings, _ in runs)
        with StopRequest() as stop:  # the fold's loop asks once per step
            assert not any(stop.requested() for _ in range(3))
        points.notice()  # after the last step
        return [{}] * len(runs)

    monkeypatch.setattr(cv, "train_folds", fold_run)
    with pytest.raises(Preempted, match=r"stopped by SIGTERM before fold 1: the folds before "):
        cv.run_cv(to_settings(tiny_config()), RunFolder(str(tmp_path)), log=lambda _: None)
    assert trained == [0] and len(points.asked) == 5 and points.asked[-1] == points.point


def ocp_args():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(data=ocp.args.JsonRestore())


@pytest.mark.parametrize("precision, expected", [("default", 0), ("highest", None)])
def test_matmul_precision_reaches_every_convolution_and_dot(data_dir, precision, expected):
    """`train.matmul_precision=highest` marks every convolution and dot of the compiled
    train and eval steps HIGHEST; 'default' marks none (XLA chooses, TF32 on GPUs)."""
    trainer = build_trainer(to_settings(tiny_config(matmul_precision=precision)), data_dir,
                            log=lambda _: None)
    state = trainer.run.parallel.put_state(trainer.run.initial_state)
    batch = trainer.run.parallel.put_batch(next(iter(trainer.train_dataset())))
    eval_batch = {"image": batch["image"]}
    for step, args in ((trainer.run.train_step, (state, batch, trainer.run.step_class_weight)),
                       (trainer.run.eval_step[False], (state, eval_batch))):
        text = step.lower(*args).as_text()
        ops = text.count("stablehlo.convolution") + text.count("stablehlo.dot_general")
        marked = text.count("HIGHEST")
        assert ops > 10
        # each op lists the precision of its two operands
        assert marked == (2 * ops if expected is None else expected), (ops, marked)


def test_best_validation_epoch_is_kept_besides_the_latest(tmp_path):
    """With a validation split, `W/best_checkpoint` keeps the one epoch-end state of the best
    validation balanced accuracy (earliest among equals), as the summary's best_val view
    picks it; `load_model(W, checkpoint="best_val")` serves it."""
    from crckd_jax import load_model

    config = tiny_config(epochs=4, checkpoint_every_steps=0)
    with config.unlocked():
        config.data.val_fraction = 0.3
        config.train.keep_checkpoints = 1
    summary = train.train_and_evaluate(to_settings(config), RunFolder(str(tmp_path)),
                                     log=lambda _: None)
    assert (tmp_path / "report" / "training_curves.png").is_file()
    records = read_records(str(tmp_path / "metrics.jsonl"))
    val = [r for r in records if r["split"] == "val" and r["model"] == "student"]
    best = max(val, key=lambda r: (r["bacc"], -r["epoch"]))
    assert summary["best_val"]["epoch"] == best["epoch"]
    best_dir = Checkpointer(RunFolder(str(tmp_path)).best_checkpoint, read_only=True)
    assert best_dir.manager.all_steps() == [best["step"]]
    assert Checkpointer(str(tmp_path / "checkpoints"), read_only=True).manager.all_steps() == [16]
    restored = best_dir.restore(best_dir.single_device_target())
    model = load_model(str(tmp_path), checkpoint="best_val")
    np.testing.assert_array_equal(
        jax.device_get(model.variables["params"]["classifier"]["kernel"]),
        np.asarray(restored.state["params"]["student"]["classifier"]["kernel"]))
    best_dir.close()


def test_a_resumed_run_restores_without_creating_the_initial_state(data_dir, tmp_path,
                                                                   monkeypatch):
    """The fresh state (the whole initialisation, compiled and run) is created by a new run
    only: resuming traces its shapes for the restore target and ends with the saved state."""
    from crckd_jax import builder
    from crckd_jax import trainer as trainer_lib

    created = []  # per call of create_train_state: made arrays (True) or traced shapes
    create = builder.create_train_state

    def recording(*args):
        state = create(*args)
        created.append(not isinstance(state.step, jax.core.Tracer))
        return state

    monkeypatch.setattr(builder, "create_train_state", recording)
    config = tiny_config(epochs=1, steps_per_epoch=2, write_report=False)
    train.train_and_evaluate(to_settings(config), RunFolder(str(tmp_path), data_dir),
                             log=lambda _: None)
    assert created == [True]
    saved = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    expected = saved.restore(saved.single_device_target()).state
    saved.close()
    created.clear()
    logs = []
    train.train_and_evaluate(to_settings(config), RunFolder(str(tmp_path), data_dir),
                             log=logs.append)
    assert created == [False] and "resumed from step 2" in "\n".join(logs)
    trainer, state, _ = trainer_lib.load_trained(to_settings(config),
                                              RunFolder(str(tmp_path), data_dir),
                                              log=lambda _: None)
    assert created == [False, False]  # evaluation restores the same way
    got, want = by_path(jax.device_get(state)), by_path(expected)
    assert got.keys() == want.keys() and len(got) > 100
    for key in got:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def by_path(tree) -> dict[str, np.ndarray]:
    """A state's leaves by their path ('params/student/...'), whatever its container types."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
