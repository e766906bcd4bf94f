"""Run integrity without training: the workdir lock, config.json and the resume check,
damaged checkpoints, a full disk, the exit codes and one-line errors of the command line.
(The clean stop on SIGTERM is in test_loop.py (in-process) and test_train.py (slow).)"""

import errno
import importlib
import itertools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crckd_jax import cli, errors, modes
from crckd_jax import config as config_lib
from crckd_jax import run_folder
from crckd_jax.config import to_settings
from crckd_jax.run_folder import RunFolder
from crckd_jax.checkpoint import Checkpointer
from crckd_jax.runlock import WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny():
    return importlib.import_module("crckd_jax.configs.demo").get_config("tiny")


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


# --- the workdir lock ----------------------------------------------------------------------

HOLD = ("import sys, time; from crckd_jax.runlock import WorkdirLock; "
        "l = WorkdirLock(sys.argv[1], 'train'); l.acquire(); print('held', flush=True); "
        "time.sleep(120)")


def test_second_run_fails_fast_naming_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(errors.WorkdirLocked, match=rf"pid {holder.pid} mode train"):
            WorkdirLock(str(tmp_path), "train").acquire()
        # Through the command line: one error line, exit status 7, before any data work.
        start = time.time()
        done = subprocess.run(
            [sys.executable, str(ROOT / "launch.py"), "--config", "demo:tiny", "--workdir",
             str(tmp_path), "--mode", "prepare"], capture_output=True, text=True, env=env(),
            timeout=120)
        assert done.returncode == errors.EXIT_LOCKED, done.stderr
        assert done.stderr.startswith(f"error: workdir {tmp_path} is in use by another run")
        assert f"pid {holder.pid}" in done.stderr and done.stderr.count("\n") == 1
        assert not (tmp_path / "data").exists() and time.time() - start < 60
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's file stays behind; its lock went with the process.
    assert f"pid {holder.pid}" in (tmp_path / "run.lock").read_text()
    with WorkdirLock(str(tmp_path), "cv"):
        assert f"pid {os.getpid()} mode cv" in (tmp_path / "run.lock").read_text()
    with WorkdirLock(str(tmp_path), "train"):  # released on exit
        pass


# --- config.json and the resume check ------------------------------------------------------

@pytest.mark.parametrize("key, value", [("optim.max_lr", math.inf),
                                        ("loss.ccd_weight", math.nan),
                                        ("memory.temperature", -math.inf)])
def test_non_finite_config_values_are_rejected(key, value):
    config = tiny()
    section, name = key.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config key '{key}' is"):
        config_lib.validate(config)


def test_config_changes_ignore_the_free_keys(tmp_path):
    started_run(tmp_path)
    folder, logs = RunFolder(str(tmp_path)), []
    config = tiny()
    with config.unlocked():
        config.train.log_every_steps = 1
        config.train.checkpoint_every_steps = 7
        config.data.read_threads = 1
        config.predict.input = "x"
    folder.check_resumable(to_settings(config), allow=False, log=logs.append)
    with config.unlocked():
        config.optim.max_lr = 1e-3
        config.train.epochs = 5
    with pytest.raises(errors.ConfigChanged, match=r"in 2 key\(s\) that change the computation: "
                       r"optim.max_lr: 0.0003 -> 0.001; train.epochs: 1 -> 5\. "):
        folder.check_resumable(to_settings(config), allow=False, log=logs.append)
    assert logs == []
    folder.check_resumable(to_settings(config), allow=True, log=logs.append)
    assert logs == ["warning: resuming with a changed config (--allow_config_change): "
                    "optim.max_lr: 0.0003 -> 0.001; train.epochs: 1 -> 5"]
    assert run_folder.RESUME_FREE_KEYS <= set(config_lib.KEYS)



def test_resume_without_the_runs_config_is_refused(tmp_path):
    """Checkpoints without config.json, none with a readable stored config: nothing to check
    the settings against, so resuming needs --allow_config_change; a key one config lacks
    prints as (absent)."""
    started_run(tmp_path)
    folder, logs = RunFolder(str(tmp_path)), []
    (tmp_path / "config.json").unlink()
    with pytest.raises(errors.ConfigChanged, match=r"holds checkpoints but no config.json"):
        folder.check_resumable(to_settings(tiny()), allow=False, log=logs.append)
    folder.check_resumable(to_settings(tiny()), allow=True, log=logs.append)
    assert logs == ["warning: resuming without the run's config.json (--allow_config_change)"]
    old = to_settings(tiny()).to_dict()
    del old["optim"]["max_lr"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(errors.ConfigChanged, match=r"optim.max_lr: \(absent\) -> 0.0003\. "):
        folder.check_resumable(to_settings(tiny()), allow=False, log=logs.append)


def started_run(workdir):
    """A workdir as `train` leaves it: config.json and a checkpoint folder."""
    RunFolder(str(workdir)).write_config(to_settings(tiny()))
    (workdir / "checkpoints" / "2").mkdir(parents=True)


def test_resume_without_config_json_checks_the_config_stored_in_the_checkpoint(tmp_path):
    """config.json lost, the checkpoints kept: the config each checkpoint stores is the
    reference (the newest readable one), so the same settings resume and changed ones are
    refused, naming the checkpoint."""
    from crckd_jax.checkpoint import Checkpointer

    settings = to_settings(tiny())
    checkpoints = Checkpointer(str(tmp_path / "checkpoints"), asynchronous=False)
    for step in (1, 2):
        checkpoints.save(step, {"w": np.full(3, step, np.float32)}, {"pos": step},
                         {"epoch": step, "config": settings.to_dict()})
    checkpoints.close()
    folder, logs = RunFolder(str(tmp_path)), []
    folder.check_resumable(settings, allow=False, log=logs.append)
    assert logs == [f"warning: {folder.config_file} is missing; the settings are checked "
                    "against the config stored in checkpoint step 2"]
    changed = tiny()
    with changed.unlocked():
        changed.optim.max_lr = 1e-3
    with pytest.raises(errors.ConfigChanged, match=r"\(the config stored in checkpoint step 2\) "
                       r"in 1 key\(s\) that change the computation: optim.max_lr: 0.0003 -> "):
        folder.check_resumable(to_settings(changed), allow=False, log=logs.append)


def test_resume_with_a_changed_config_stops_before_restoring(tmp_path, capsys):
    started_run(tmp_path)
    config = tiny()
    with config.unlocked():
        config.optim.max_lr = 1e-3
        config.train.log_every_steps = 1  # free
    with pytest.raises(SystemExit) as info:
        cli.execute("train", config, str(tmp_path), tracebacks=False)
    err = capsys.readouterr().err
    assert info.value.code == errors.EXIT_CONFIG and err.count("\n") == 1
    assert "optim.max_lr: 0.0003 -> 0.001" in err and "log_every_steps" not in err
    assert "--allow_config_change" in err
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["max_lr"] == 3e-4
    assert not (tmp_path / "data").exists()  # stopped before loading anything


def test_eval_and_predict_take_the_config_from_the_workdir(tmp_path):
    argv = ["crckd", "--workdir", str(tmp_path), "--mode=eval", "--config.train.batch_size=4"]
    with pytest.raises(SystemExit):
        cli.add_run_config(argv)  # no config.json yet
    RunFolder(str(tmp_path)).write_config(to_settings(tiny()))
    got = cli.add_run_config(argv)
    assert got[1] == f"--config={ROOT / 'crckd_jax' / 'run_config.py'}:{tmp_path}/config.json"
    assert got[2:] == argv[1:]
    assert cli.add_run_config(["crckd", "--workdir", str(tmp_path), "--config", "demo"]) == [
        "crckd", "--workdir", str(tmp_path), "--config", "demo"]
    from crckd_jax import run_config

    assert run_config.get_config(str(tmp_path / "config.json")).to_dict() == tiny().to_dict()


def test_config_is_required_for_train_without_it(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert done.returncode == errors.EXIT_CONFIG
    assert done.stderr == "error: --config is required for --mode train\n"


# --- checkpoints: damaged, leftovers, full disk --------------------------------------------

def small_state(value):
    return {"w": jnp.full((4, 3), value, jnp.float32), "b": jnp.arange(5.0) * value}


def save_steps(directory, steps):
    checkpoints = Checkpointer(str(directory), asynchronous=False)
    for step in steps:
        checkpoints.save(step, small_state(float(step)), {"pos": step}, {"epoch": step})
    checkpoints.close()


def largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_export_and_eval_pass_over_a_newest_checkpoint_whose_metadata_is_damaged(tmp_path):
    """The single-device restore target (export, predict, load_model) comes from the newest
    checkpoint whose metadata reads; with every newer one's array data damaged too, the
    read-only restore falls back to the older step, and no failure prints an object's
    repr."""
    from crckd_jax.checkpoint import restore_read_only

    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    for path in (directory / "2" / "state").rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            path.write_bytes(b"{")  # metadata and array data of step 2 unreadable
    lines = []
    restored = restore_read_only(str(directory), Checkpointer.single_device_target,
                                 str(tmp_path), lines.append)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], np.full((4, 3), 1.0))
    assert len(lines) == 1 and "checkpoint step 2" in lines[0] and "<" not in lines[0]


def test_damaged_newest_checkpoint_is_reported_moved_and_the_previous_restored(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    victim = largest_file(directory / "2" / "state")
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # truncated
    (directory / "3.orbax-checkpoint-tmp-1234").mkdir()  # a killed save's leftover

    # eval: read-only, reports and falls back, moves nothing.
    lines = []
    reader = Checkpointer(str(directory), read_only=True)
    restored = reader.restore_newest_good(small_state(0.0), log=lines.append,
                                          move_damaged=False)
    reader.close()
    assert restored.step == 1 and restored.data == {"pos": 1}
    np.testing.assert_array_equal(restored.state["w"], np.full((4, 3), 1.0))
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 2 (") and "earlier one" in lines[0]
    assert (directory / "2").is_dir()

    # train: the damaged one goes to damaged_checkpoints/, the leftover tmp folder is removed.
    lines = []
    checkpoints = Checkpointer(str(directory), asynchronous=False)
    assert not (directory / "3.orbax-checkpoint-tmp-1234").exists()
    restored = checkpoints.restore_newest_good(small_state(0.0), log=lines.append)
    assert restored.step == 1 and len(lines) == 1
    assert "checkpoint step 2 cannot be restored" in lines[0]
    moved = list((tmp_path / "damaged_checkpoints").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("2-") and f"moved to {moved[0]}" in lines[0]
    assert not (directory / "2").exists() and checkpoints.latest_step() == 1
    checkpoints.save(2, small_state(5.0), {"pos": 2}, {})  # the step can be saved again
    checkpoints.close()
    assert Checkpointer(str(directory)).restore(small_state(0.0)).state["w"][0, 0] == 5.0


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    checkpoints = Checkpointer(str(directory), asynchronous=False)
    lines = []
    wrong_shape = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(5)}  # a config that does not fit
    assert checkpoints.restore_newest_good(wrong_shape, log=lines.append) is None
    checkpoints.close()
    assert checkpoints.failure.startswith("step 2: ") and lines == []
    assert (directory / "1").is_dir() and (directory / "2").is_dir()
    assert not (tmp_path / "damaged_checkpoints").exists()


def test_full_disk_during_a_save_names_the_folder_and_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1])
    checkpoints = Checkpointer(str(directory), asynchronous=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "2"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(errors.StorageError) as info:
        checkpoints.save(2, small_state(2.0), {}, {})
    message = str(info.value)
    assert message == (f"saving checkpoint step 2 failed: No space left on device "
                       f"({directory / '2'}); the last good checkpoint is step 1 in {directory}")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    checkpoints.close()
    assert Checkpointer(str(directory)).latest_step() == 1  # nothing earlier lost


def test_failures_end_with_one_line_and_their_exit_code(tmp_path, monkeypatch, capsys):
    cases = [
        (errors.StorageError("saving checkpoint step 2 failed: disk"), errors.EXIT_IO),
        (OSError(errno.ENOSPC, "No space left on device", "/w/x"), errors.EXIT_IO),
        (errors.TrainingDiverged("non-finite loss at step 2"), errors.EXIT_DIVERGED),
        (errors.Preempted("stopped by SIGTERM after step 3"), errors.EXIT_PREEMPTED),
        (errors.CheckpointUnavailable("no checkpoint"), errors.EXIT_CHECKPOINT),
        (RuntimeError("boom"), errors.EXIT_UNEXPECTED),
    ]
    # With tracebacks (CRCKD_TRACEBACK=1, --verbosity=1): the traceback first, then the same
    # last line and exit status.
    for (error, code), tracebacks in itertools.product(cases, (False, True)):
        def raising(mode, settings, folder, allow, share, error=error):
            raise error
        monkeypatch.setattr(modes, "run", raising)
        with pytest.raises(SystemExit) as info:
            cli.execute("train", tiny(), str(tmp_path), tracebacks=tracebacks)
        err = capsys.readouterr().err
        assert info.value.code == code, (error, err)
        assert err.splitlines()[-1].startswith("error: "), err
        if tracebacks:
            assert err.startswith("Traceback (most recent call last)"), err
        else:
            assert err.startswith("error: ") and err.count("\n") == 1, err
    monkeypatch.setenv("CRCKD_TRACEBACK", "1")
    assert cli.show_tracebacks()


def test_predict_skips_bad_images_only_when_asked(tmp_path):
    from PIL import Image

    from crckd_jax.errors import DataError
    from crckd_jax.predict import _good_images

    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [str(good), str(broken), str(tmp_path / "missing.png"), str(good)]
    bad = []
    kept = [position for position, image in _good_images(paths, 16, True, bad)]
    assert kept == [0, 3] and bad == paths[1:3]
    with pytest.raises(DataError, match=r"broken\.jpg.*data\.skip_bad_images=True"):
        list(_good_images(paths, 16, False, []))


def test_checks_that_need_no_data_run_before_it_is_prepared(tmp_path, capsys):
    """A batch that does not split into the BatchNorm groups, or pretrained weights that do
    not fit the model: one error line before any data is generated or prepared."""
    config = tiny()
    with config.unlocked():
        config.model.bn_group_size = 3  # the batch of 8 does not split into groups of 3
    with pytest.raises(SystemExit) as info:
        cli.execute("train", config, str(tmp_path / "a"), tracebacks=False)
    assert info.value.code == errors.EXIT_CONFIG
    assert "'model.bn_group_size' is 3: expected a divisor of the per-device batch" in (
        capsys.readouterr().err)
    assert not (tmp_path / "a" / "data").exists()
    weights = tmp_path / "densenet121.npz"
    np.savez(weights, **{"features.conv0.weight": np.zeros((64, 3, 7, 7), np.float32)})
    config = tiny()
    with config.unlocked():
        config.model.pretrained = str(weights)
    with pytest.raises(SystemExit) as info:
        cli.execute("train", config, str(tmp_path / "b"), tracebacks=False)
    err = capsys.readouterr().err
    assert info.value.code == errors.EXIT_CHECKPOINT and err.count("\n") == 1, err
    assert not (tmp_path / "b" / "data").exists()



def test_an_empty_workdir_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.execute("train", tiny(), "", tracebacks=False)
    assert info.value.code == errors.EXIT_CONFIG
    assert capsys.readouterr().err == "error: --workdir is '': expected a folder\n"


def test_a_failing_tensorboard_writer_neither_hangs_nor_passes_silently(tmp_path,
                                                                       monkeypatch):
    """The TensorBoard writer's thread stopped by a write error (as on a full disk): records
    and `close` still return at once; a failing flush is a StorageError naming the folder."""
    import threading

    from tensorboardX import event_file_writer

    from crckd_jax.logger import MetricLogger

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    logger = MetricLogger(str(tmp_path))
    monkeypatch.setattr(event_file_writer.EventsWriter, "_write_serialized_event", full)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's end
    start = time.monotonic()
    for step in range(1, 201):  # far more events than tensorboardX's default queue of 10
        logger.write({"split": "train", "step": step, "epoch": 0, "loss": 1.0})
    logger.close()
    assert time.monotonic() - start < 10
    with pytest.raises(errors.StorageError, match=r"cannot write .*tensorboard: No space"):
        MetricLogger(str(tmp_path))  # the first event is written at once
    monkeypatch.undo()
    logger = MetricLogger(str(tmp_path))
    monkeypatch.setattr(event_file_writer.EventsWriter, "flush", full)
    with pytest.raises(errors.StorageError, match=r"cannot write .*tensorboard: No space"):
        logger.write({"split": "train", "step": 1, "epoch": 0, "loss": 1.0})
    monkeypatch.undo()
    logger.close()


def test_eval_with_settings_that_change_the_computation_is_refused(tmp_path, capsys):
    """`--mode eval` on the run's own split with an override that changes what the model
    computes (here the input size) stops before loading anything, naming the key."""
    started_run(tmp_path)
    config = tiny()
    with config.unlocked():
        config.data.image_size = 64
    with pytest.raises(SystemExit) as info:
        cli.execute("eval", config, str(tmp_path), tracebacks=False)
    err = capsys.readouterr().err
    assert info.value.code == errors.EXIT_CONFIG and err.count("\n") == 1
    assert "data.image_size: 32 -> 64" in err and "--allow_config_change" in err
