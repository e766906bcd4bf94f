"""End to end through `launch.py` on `configs/demo.py:tiny`: train, resume after SIGKILL,
cross-validation, evaluation, prediction, the NaN guard and config errors."""

import csv
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crckd_jax import errors
from crckd_jax.config import to_settings
from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "demo.py") + ":tiny"


def launch_command(workdir, *flags):
    """`launch.py` on the tiny demo (compilation cache: the session's, see conftest)."""
    return [sys.executable, str(ROOT / "launch.py"), "--config", TINY, "--workdir", str(workdir),
            *flags]


def launch(workdir, *flags, check=True):
    done = subprocess.run(launch_command(workdir, *flags), capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def final_state(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    with ocp.CheckpointManager(directory, item_names=("state", "data", "meta")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    return step, restored["state"], restored["data"]


def leaves(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# Three epochs of two steps, a checkpoint after every step: the run the artefact, eval,
# predict and export tests read, and the uninterrupted run the SIGKILL test compares with.
TRAINED_FLAGS = ("--config.train.epochs=3", "--config.train.checkpoint_every_steps=1")
# The runs whose figures no test reads leave them out (matplotlib's import and drawing).
NO_REPORT = "--config.train.write_report=false"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train")
    done = launch(workdir, *TRAINED_FLAGS)
    return workdir, done


def test_train_writes_every_artefact(trained):
    workdir, done = trained
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == {"final", "mean_last_11", "best_val", "embedding"}
    assert summary["best_val"] is None
    assert set(summary["embedding"]) == {"cos_own_centroid", "cos_other_centroids",
                                         "silhouette"}
    assert -1 <= summary["embedding"]["silhouette"] <= 1
    assert set(summary["final"]) == {"acc", "bacc", "prec", "rec", "f1", "auc_ovr", "auc_ovo",
                                     "spec", "kappa"}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "test"}
    train = [r for r in records if r["split"] == "train"]
    assert all(np.isfinite(r[k]) for r in train for k in ("loss", "ce", "mt", "ccd", "crp"))
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    step, state, data = final_state(workdir)  # the last step's checkpoint, restorable
    assert step == 6 and int(state["step"]) == 6 and data
    for name in ("training_curves", "confusion_matrix", "roc_curves", "tsne_embeddings"):
        assert (workdir / "report" / f"{name}.png").stat().st_size > 10_000
    assert "test (final epoch)" in done.stdout


def test_eval_and_predict_use_the_checkpoint(trained):
    workdir, _ = trained
    # No --config: eval reads the run's W/config.json; overrides apply on top.
    command = [a for a in launch_command(workdir, "--mode", "eval")
               if a not in ("--config", TINY)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "densenet_small"
    results = json.loads((workdir / "eval.json").read_text())
    summary = json.loads((workdir / "summary.json").read_text())
    assert results["test"]["bacc"] == pytest.approx(summary["final"]["bacc"])
    last = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert results["checkpoint_step"] == last and f"checkpoint step {last}" in done.stdout

    images = sorted((workdir / "data" / "synthetic").rglob("*.jpg"))[:11]
    listing = workdir / "to_predict.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([["image"]] + [[os.path.relpath(p, workdir)] for p in images])
    launch(workdir, "--mode", "predict", f"--config.predict.input={listing}")
    with open(workdir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11
    classes = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
    assert list(rows[0]) == ["path", "predicted"] + [f"prob_{c}" for c in classes]
    for row in rows:
        probs = np.array([float(row[f"prob_{c}"]) for c in classes])
        assert abs(probs.sum() - 1) < 1e-4 and row["predicted"] == classes[np.argmax(probs)]


def test_sigkill_mid_run_then_resume_matches_uninterrupted(trained, tmp_path):
    """SIGKILL after the first checkpoint: the TensorBoard events logged so far are on disk
    (flushed at every record), and the resumed run ends bit-identical to the uninterrupted
    one (a record every step: logging does not change the computation)."""
    straight, _ = trained
    killed = tmp_path / "killed"
    flags = (*TRAINED_FLAGS, NO_REPORT, "--config.train.log_every_steps=1")
    proc = subprocess.Popen(launch_command(killed, *flags), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "1"
    deadline = time.time() + 300
    while not first.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 6, f"killed too late: checkpoints {steps}"
    events = list((killed / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(b"train/loss" in e.read_bytes() for e in events), events

    resumed = launch(killed, *flags)
    assert "resumed from step" in resumed.stdout
    assert (killed / "summary.json").is_file() and not (killed / "report").exists()
    step_a, state_a, data_a = final_state(straight)
    step_b, state_b, data_b = final_state(killed)
    assert step_a == step_b == 6 and data_a == data_b
    a, b = leaves(state_a), leaves(state_b)
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (mounting needs root; skipped where it is refused), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory):
    """Writes `directory`/filler until the file system is full; returns its path."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_a_full_disk_mid_run_stops_with_one_line_and_resumes_exactly(trained, small_disk):
    """The workdir's file system fills up after the first checkpoint: the run stops within
    10 s with exit 5 and one error line (no traceback) naming what it could not write; the
    newest complete checkpoint restores; once space is freed the run resumes and ends
    bit-identical to the uninterrupted one."""
    straight, _ = trained
    workdir = small_disk / "run"
    proc = subprocess.Popen(launch_command(workdir, *TRAINED_FLAGS, NO_REPORT), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = workdir / "checkpoints" / "1"
    deadline = time.time() + 300
    while not first.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the disk could be filled"
    filler = fill(small_disk)
    full_at = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - full_at < 10 and proc.returncode == errors.EXIT_IO, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert str(workdir) in lines[-1] and "No space left on device" in lines[-1], lines[-1]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 6, f"the disk filled too late: checkpoints {steps}"

    filler.unlink()
    resumed = launch(workdir, *TRAINED_FLAGS, NO_REPORT)
    assert "resumed from step" in resumed.stdout
    step_a, state_a, data_a = final_state(straight)
    step_b, state_b, data_b = final_state(workdir)
    assert step_a == step_b == 6 and data_a == data_b
    a, b = leaves(state_a), leaves(state_b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def wait_for_train_record(workdir, proc, timeout=400):
    """Waits until the run at `workdir` logged a training step (it is past compiling)."""
    metrics_file = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and '"split": "train"' in metrics_file.read_text():
            return
        time.sleep(0.05)
    raise AssertionError("no training step was logged before the run ended or timed out")


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_75_and_resume_matches_uninterrupted(tmp_path):
    flags = ("--config.train.epochs=2", "--config.train.steps_per_epoch=40",
             "--config.train.checkpoint_every_steps=0", "--config.train.log_every_steps=1")
    straight = subprocess.Popen(launch_command(tmp_path / "straight", *flags), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(launch_command(stopped, *flags), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_train_record(stopped, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM after step "), err[-3000:]
    step = int(last.split("after step ")[1].split()[0])
    assert f"checkpoint step {step} saved" in last and step < 40, last
    steps = sorted(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [step]  # only the signal's save: mid-epoch, no periodic checkpoint
    assert "Traceback" not in err and "can't create new thread" not in err

    resumed = launch(stopped, *flags)
    assert f"resumed from step {step}" in resumed.stdout
    assert "can't create new thread" not in resumed.stderr
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    step_a, state_a, data_a = final_state(tmp_path / "straight")
    step_b, state_b, data_b = final_state(stopped)
    assert step_a == step_b == 80 and data_a == data_b
    a, b = leaves(state_a), leaves(state_b)
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    train_steps = [r["step"] for r in map(json.loads, (stopped / "metrics.jsonl").read_text()
                                          .splitlines()) if r["split"] == "train"]
    assert train_steps == list(range(1, 81))  # no step twice, none missing
    assert len(list((stopped / "tensorboard").glob("events.out.tfevents.*"))) == 2


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    flags = ("--config.train.checkpoint_every_steps=1",)
    launch(tmp_path / "straight", *flags)
    victim = max((p for p in (tmp_path / "straight" / "checkpoints" / "2").rglob("*")
                  if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
    # eval: reports the damaged one, uses step 1, moves nothing.
    evaluated = launch(tmp_path / "straight", "--mode", "eval")
    assert "warning: checkpoint step 2 (" in evaluated.stdout
    assert (tmp_path / "straight" / "checkpoints" / "2").is_dir()
    # train: moves it aside, resumes from step 1 and ends at step 2 again.
    (tmp_path / "straight" / "summary.json").unlink()
    resumed = launch(tmp_path / "straight", *flags)
    assert "warning: checkpoint step 2 cannot be restored" in resumed.stdout
    assert "resumed from step 1" in resumed.stdout
    moved = list((tmp_path / "straight" / "damaged_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["2"]
    step, _, _ = final_state(tmp_path / "straight")
    assert step == 2


def test_cv_summary_counts_the_finite_values_and_leaves_the_others_out():
    """A metric that is not finite in a fold (a diverged run's NaN) is left out of that
    metric's mean and std, its `n` says how many folds remain, and one finite in no fold is
    n/a in the markdown."""
    from crckd_jax import cv
    from crckd_jax.metrics import METRIC_KEYS

    def views(bacc, auc):
        final = {**dict.fromkeys(METRIC_KEYS, 0.5), "bacc": bacc, "auc_ovr": auc}
        return {"final": final, "mean_last_11": final, "best_val": None}

    result = cv.aggregate({0: views(0.6, float("nan")), 1: views(float("nan"), None),
                           2: views(0.8, float("inf"))})
    assert result["final"]["bacc"] == pytest.approx({"mean": 0.7, "std": 0.1, "n": 2})
    assert result["final"]["auc_ovr"] == {"mean": None, "std": None, "n": 0}
    assert result["final"]["f1"] == pytest.approx({"mean": 0.5, "std": 0.0, "n": 3})
    text = cv.markdown(result)
    assert "| bacc | 0.7000 | 0.1000 |" in text and "| auc_ovr | n/a | n/a |" in text


def test_cv_trains_the_folds_not_done_and_summarises_all(tmp_path, trained):
    """Fold 0 is done (a summary.json of its own: the trained run's), fold 1 is trained on
    its own fold; the cross-validation summary is the mean and std over both."""
    done_summary = json.loads((trained[0] / "summary.json").read_text())
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "summary.json").write_text(json.dumps(done_summary))
    done = launch(tmp_path, "--mode", "cv", "--config.data.num_folds=2", NO_REPORT)
    assert "fold 0: done earlier" in done.stdout and "fold 1: training" in done.stdout
    fold_1 = json.loads((tmp_path / "fold_1" / "config.json").read_text())
    assert fold_1["data"]["fold"] == 1 and fold_1["data"]["num_folds"] == 2
    trained_1 = json.loads((tmp_path / "fold_1" / "summary.json").read_text())
    result = json.loads((tmp_path / "cv_summary.json").read_text())
    assert result["folds"] == [0, 1]
    pair = [done_summary["final"]["bacc"], trained_1["final"]["bacc"]]
    assert result["final"]["bacc"] == pytest.approx(
        {"mean": np.mean(pair), "std": np.std(pair), "n": 2}, rel=1e-12)
    assert "| bacc |" in (tmp_path / "cv_summary.md").read_text()


def compiled_train_steps(cache) -> int:
    """How many train-step executables `cache` (a persistent compilation cache) holds."""
    return len(list(pathlib.Path(cache).glob("jit_train_with_lr-*")))


def test_cv_compiles_one_train_step_for_folds_of_different_sizes(tmp_path):
    """The bank memory takes the shape of the data set's largest training part and the
    class weights are an input of the step: 2 folds of 3 (93 and 94 training items,
    different class counts) run one executable, read from the cache by the second fold."""
    cache = tmp_path / "xla"
    done = launch(tmp_path / "w", "--mode", "cv", "--config.data.num_folds=3",
                  "--config.data.folds=0,2", "--config.memory.kind=bank",
                  f"--config.train.compilation_cache_dir={cache}", NO_REPORT)
    assert "fold 2: training" in done.stdout
    sizes = [f["train"] for f in json.loads((tmp_path / "w" / "data_summary.json")
                                            .read_text())["folds"]]
    assert sizes[0] != sizes[2], sizes  # the folds differ, so the padding is exercised
    rows = {k: final_state(tmp_path / "w" / f"fold_{k}")[1]["memory"]["student"].shape[0]
            for k in (0, 2)}
    assert rows == {0: max(sizes), 2: max(sizes)}
    assert compiled_train_steps(cache) == 1


def test_table_trains_rungs_by_folds_and_writes_the_table(tmp_path, trained):
    """--mode table: a unit already done (crckd, fold 0: the trained run's summary) is read,
    the others are trained with their rung's loss weights, seed and fold; every cell is the
    mean and std of its units' summaries; a second run trains nothing."""
    done_summary = json.loads((trained[0] / "summary.json").read_text())
    seed = json.loads((trained[0] / "config.json").read_text())["seed"]
    placed = tmp_path / "crckd" / f"seed_{seed}" / "fold_0"
    placed.mkdir(parents=True)
    (placed / "summary.json").write_text(json.dumps(done_summary))
    cache = tmp_path / "xla"
    flags = ("--mode", "table", "--config.table.rungs=baseline,crckd",
             "--config.data.num_folds=2", f"--config.train.compilation_cache_dir={cache}",
             NO_REPORT)
    done = launch(tmp_path, *flags)
    assert compiled_train_steps(cache) == 2  # one per rung, whatever the folds
    assert f"crckd seed {seed} fold 0: done earlier" in done.stdout
    for rung, fold in (("baseline", 0), ("baseline", 1), ("crckd", 1)):
        assert f"{rung} seed {seed} fold {fold}: training" in done.stdout
        config = json.loads((tmp_path / rung / f"seed_{seed}" / f"fold_{fold}" / "config.json")
                            .read_text())
        assert config["data"]["fold"] == fold and config["seed"] == seed
        assert config["loss"]["ccd_weight"] == (0.0 if rung == "baseline" else 0.1)
        assert config["loss"]["consistency"] == (0.0 if rung == "baseline" else 1.0)
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["rungs"] == ["baseline", "crckd"] and table["folds"] == [0, 1]
    assert table["rows"]["crckd"]["units"][0] == {"seed": seed, "fold": 0,
                                                  "folder": f"crckd/seed_{seed}/fold_0"}
    units = {rung: [json.loads((tmp_path / rung / f"seed_{seed}" / f"fold_{k}" / "summary.json")
                               .read_text()) for k in (0, 1)] for rung in table["rungs"]}
    for rung, summaries in units.items():
        row = table["rows"][rung]
        for view, key in (("final", "bacc"), ("mean_last_11", "auc_ovr")):
            pair = [s[view][key] for s in summaries]
            assert row[view][key] == pytest.approx(
                {"mean": np.mean(pair), "std": np.std(pair), "n": 2}, rel=1e-12)
        pair = [s["embedding"]["silhouette"] for s in summaries if "embedding" in s]
        assert row["embedding"]["silhouette"]["n"] == len(pair) >= 1
        assert row["embedding"]["silhouette"]["mean"] == pytest.approx(np.mean(pair))
    text = (tmp_path / "table.md").read_text()
    assert "| baseline | " in text and "| crckd | " in text and "(table.png)" in text
    assert "cos_own_centroid" in text
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert len(rows) == 2 * (2 * 9 + 3)
    assert (tmp_path / "table.png").stat().st_size > 10_000
    again = launch(tmp_path, *flags)
    assert "training" not in again.stdout and again.stdout.count("done earlier") == 4
    # A cell's unit equals the same run trained alone with `--mode train`.
    unit = tmp_path / "baseline" / f"seed_{seed}" / "fold_1"
    loss = json.loads((unit / "config.json").read_text())["loss"]
    launch(tmp_path / "alone", "--config.data.num_folds=2", "--config.data.fold=1",
           f"--config.seed={seed}", *(f"--config.loss.{k}={loss[k]}"
                                      for k in ("consistency", "ccd_weight", "crp_weight")),
           NO_REPORT)
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert alone == json.loads((unit / "summary.json").read_text())


def test_non_finite_loss_stops_with_step_and_terms(tmp_path):
    done = launch(tmp_path, "--config.optim.max_lr=1e30",
                  "--config.train.checkpoint_every_steps=1", check=False)
    assert done.returncode != 0
    assert "non-finite loss at step 2" in done.stderr and "ce=" in done.stderr
    assert (tmp_path / "checkpoints" / "1").is_dir()


@pytest.mark.parametrize("flag, message", [
    ("--config.train.epoch=3", "train.epoch"),
    ("--config.train.epochs=two", "train.epochs"),
])
def test_bad_config_flags_are_named(tmp_path, flag, message):
    """Overrides the command line's parser rejects (an unknown key, a value of the wrong
    type): one error line from `launch.py`, nothing written."""
    done = launch(tmp_path, flag, check=False)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "checkpoints").exists()


def tiny_config(**overrides):
    """configs/demo.py:tiny with `overrides` ({"section.key": value}) set."""
    from crckd_jax.configs import demo

    config = demo.get_config("tiny")
    with config.unlocked():
        for key, value in overrides.items():
            section, name = key.split(".")
            config[section][name] = value
    return config


def execute_failing(config, workdir, capsys):
    """`crckd_jax.cli.execute` of `train` in this process: (exit status, stderr)."""
    from crckd_jax import cli

    with pytest.raises(SystemExit) as info:
        cli.execute("train", config, str(workdir), tracebacks=False)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"data.fold": 7}, "error: config key 'data.fold' is 7: expected an integer in [0, 4]"),
    ({"model.pretrained": "/nonexistent/densenet121.pth"},
     "error: config key 'model.pretrained' is '/nonexistent/densenet121.pth': expected an "
     "existing torchvision DenseNet checkpoint file"),
    ({"memory.kind": "stack"}, "error: config key 'memory.kind' is 'stack': expected one of "
                               "'queue', 'bank'"),
])
def test_bad_config_values_are_named(tmp_path, capsys, overrides, message):
    code, err = execute_failing(tiny_config(**overrides), tmp_path, capsys)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not tmp_path.joinpath("checkpoints").exists()


def test_missing_data_dir_is_named(tmp_path, capsys):
    code, err = execute_failing(tiny_config(**{
        "data.source": "ham10000", "data.dir": "/nonexistent/HAM10000",
        "model.pretrained": "none"}), tmp_path, capsys)
    assert code == 3 and err.startswith("error: ") and "/nonexistent/HAM10000" in err, err


def test_real_data_needs_pretrained_weights_or_an_explicit_none(tmp_path, capsys):
    """Training on a real source without model.pretrained stops before anything is read,
    naming torchvision's file; 'none' passes that check (and fails later on the data)."""
    code, err = execute_failing(tiny_config(**{
        "data.source": "ham10000", "data.dir": "/nonexistent/HAM10000"}), tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: config key 'model.pretrained' is '': the reference starts "), err
    assert "'none'" in err and "/nonexistent/HAM10000" not in err
    assert not (tmp_path / "checkpoints").exists()
    from crckd_jax import config as config_lib

    config = config_lib.default_config()
    config.data.source, config.data.dir = "aptos", "/data/aptos"
    with pytest.raises(config_lib.ConfigError, match=r"densenet121-a639ec97\.pth"):
        config_lib.require_initialisation(Settings.from_dict(config.to_dict()))
    config.model.pretrained = "none"
    config_lib.require_initialisation(Settings.from_dict(config.to_dict()))


def test_pretrained_backbone_for_student_and_teacher(tmp_path):
    from crckd_jax.memory import QueueMemory
    from crckd_jax.models.densenet import CRCKDNet, densenet_config
    from crckd_jax.models.networks import Networks
    from crckd_jax.optim import make_optimizer
    from crckd_jax.state import create_train_state
    from crckd_jax.builder import _with_pretrained

    with np.load(ROOT / "tests" / "fixtures" / "densenet_small.npz") as f:
        state_dict = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
    path = tmp_path / "densenet_small.npz"
    np.savez(path, **state_dict)
    model = CRCKDNet(densenet_config("densenet_small"), 7)
    state = create_train_state(jax.random.key(0), Networks(model, 16), make_optimizer(10),
                               lambda k: QueueMemory.create(k, 7, 4, 16), (32, 32, 3))
    loaded = _with_pretrained(state, model, str(path))
    want = np.transpose(state_dict["features.conv0.weight"], (2, 3, 1, 0))
    for params in (loaded.params["student"], loaded.ema_params):
        np.testing.assert_array_equal(params["features"]["conv0"]["kernel"], want)
    for stats in (loaded.batch_stats, loaded.ema_batch_stats):
        np.testing.assert_array_equal(stats["features"]["norm5"]["var"],
                                      state_dict["features.norm5.running_var"])
    # Each network keeps its own head: the teacher is a second initialisation, as the
    # reference's second create_model.
    np.testing.assert_array_equal(loaded.params["student"]["classifier"]["kernel"],
                                  state.params["student"]["classifier"]["kernel"])
    np.testing.assert_array_equal(loaded.ema_params["classifier"]["kernel"],
                                  state.ema_params["classifier"]["kernel"])
    assert not np.array_equal(loaded.ema_params["classifier"]["kernel"],
                              loaded.params["student"]["classifier"]["kernel"])


def test_reference_protocol_runs_partial_batches_and_resets_the_learning_rate(tmp_path):
    """The reference settings on the tiny demo (112 training items, batch 12 in BatchNorm
    groups of 4): 10 steps per epoch, the last of each with 4 items; the first step of the
    second epoch at optim.learning_rate; finite losses throughout."""
    done = launch(tmp_path, "--config.train.epochs=2", "--config.train.steps_per_epoch=0",
                  "--config.train.batch_size=12", "--config.train.keep_partial_batch=true",
                  "--config.model.bn_group_size=4", "--config.model.reference_double_bn_update=true",
                  "--config.optim.reset_lr_each_epoch=true", "--config.memory.kind=bank",
                  "--config.train.log_every_steps=1", NO_REPORT)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21)), done.stdout[-2000:]
    assert all(np.isfinite(r[k]) for r in train for k in ("loss", "ce", "mt", "ccd", "crp"))
    lrs = {r["step"]: r["learning_rate"] for r in train}
    assert lrs[11] == pytest.approx(1e-4, rel=1e-6)  # update 10: the first of epoch 2
    assert lrs[10] != pytest.approx(1e-4, rel=1e-3) and lrs[12] != pytest.approx(1e-4, rel=1e-3)
    assert json.loads((tmp_path / "summary.json").read_text())["mean_last_11"] is not None


def test_export_predict_and_eval_without_the_training_data(trained, tmp_path):
    """Export from a copy of the run whose data folder is gone; the exported model gives the
    trainer's evaluation probabilities; predict and eval on labelled images read nothing but
    the model."""
    import shutil

    from PIL import Image

    from crckd_jax import inference, load_model, predict, run_config, trainer as trainer_lib
    from crckd_jax.data import augment, sources
    from crckd_jax.errors import DataError
    from crckd_jax.errors import CheckpointUnavailable
    from crckd_jax.metrics import classification_metrics

    workdir, _ = trained
    images = sorted((workdir / "data" / "synthetic").rglob("*.jpg"))[:5]
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "data")
    files = lambda: {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()
                     and p.relative_to(copy).parts[0] not in
                     ("export", "predictions.csv", "eval_input.json")}
    before = files()
    command = [a for a in launch_command(copy, "--mode", "export")
               if a not in ("--config", TINY)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (copy / "data").exists()
    description = json.loads((copy / "export" / "model.json").read_text())
    assert description["models"] == ["student"] and description["image_size"] == 32
    assert description["class_names"] == ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]

    # The trainer's eval step on the original run, on the same images.
    config = run_config.get_config(str(workdir / "config.json"))
    trainer, state, _ = trainer_lib.load_trained(to_settings(config), RunFolder(str(workdir)),
                                              log=lambda _: None)
    model = load_model(str(copy))
    decoded = [np.asarray(sources.load_rgb(str(p), model.store_size)) for p in images]
    batch = np.zeros((config.train.batch_size, 32, 32, 3), np.uint8)
    batch[:5] = [np.asarray(augment.resize(d, 32)) for d in decoded]
    expected = trainer.run.parallel.gather_examples(
        trainer.run.eval_step[False](
            state, trainer.run.parallel.put_batch({"image": batch})))["probs"]
    np.testing.assert_allclose(model(decoded), expected[:5], rtol=1e-5, atol=1e-7)
    # Any size: resized to the stored size, then to the model's.
    big = [np.asarray(Image.fromarray(d).resize((48, 40))) for d in decoded]
    assert model(big).shape == (5, 7)

    listing = tmp_path / "inputs.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([["image"]] + [[str(p)] for p in images])
    command = [a for a in launch_command(copy, "--mode", "predict",
                                         f"--config.predict.input={listing}")
               if a not in ("--config", TINY)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(copy / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    got = np.array([[float(r[f"prob_{c}"]) for c in description["class_names"]] for r in rows])
    np.testing.assert_allclose(got, expected[:5], atol=2e-6)
    assert not (copy / "data").exists()

    # Metrics on labelled images (a CSV of class names, a folder per class): the model's
    # probabilities scored by the metrics module.
    metadata = (workdir / "data" / "synthetic" / "HAM10000_metadata.csv").read_text()
    label_of = {r["image_id"]: r["dx"] for r in csv.DictReader(metadata.splitlines())}
    labelled = []  # three images of every class
    for path in sorted((workdir / "data" / "synthetic").rglob("*.jpg")):
        if sum(label_of[p.stem] == label_of[path.stem] for p in labelled) < 3:
            labelled.append(path)
    names = [label_of[p.stem] for p in labelled]
    assert len(labelled) == 21
    with open(tmp_path / "labelled.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "dx"]] + [[str(p), n] for p, n in zip(labelled, names)])
    command = [a for a in launch_command(copy, "--mode", "eval",
                                         f"--config.eval.input={tmp_path / 'labelled.csv'}",
                                         "--config.eval.image_column=file",
                                         "--config.eval.label_column=dx")
               if a not in ("--config", TINY)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((copy / "eval_input.json").read_text())
    classes = description["class_names"]
    expected_scores = classification_metrics(
        model.predict_files([str(p) for p in labelled]),
        np.array([classes.index(n) for n in names]), len(classes))
    assert results["num_images"] == 21 and results["num_skipped"] == 0
    for key, value in expected_scores.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key
    by_class = tmp_path / "by_class"
    for p, n in zip(labelled, names):
        (by_class / n).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, by_class / n)
    config.eval.input = str(by_class)
    from_folder = predict.evaluate_input(to_settings(config), RunFolder(str(copy)),
                                         log=lambda _: None)
    assert from_folder["input"] == str(by_class) and from_folder["num_images"] == 21
    for key, value in expected_scores.items():
        assert from_folder[key] == pytest.approx(value, abs=1e-6), key
    (by_class / "melanoma").mkdir()
    with pytest.raises(DataError, match=r"by_class/melanoma' is not named after a class .*"
                                        r"expected one of \['mel', 'nv'"):
        predict.evaluate_input(to_settings(config), RunFolder(str(copy)),
                                         log=lambda _: None)
    with open(tmp_path / "labelled.csv", "a", newline="") as f:
        csv.writer(f).writerow([str(labelled[0]), "melanoma"])
    config.eval.input = str(tmp_path / "labelled.csv")
    config.eval.image_column, config.eval.label_column = "file", "dx"
    with pytest.raises(DataError, match=r"labelled.csv, row 23: dx 'melanoma' is not a class"):
        predict.evaluate_input(to_settings(config), RunFolder(str(copy)),
                                         log=lambda _: None)

    # Evaluating the run's own test split needs its data set: an error, nothing prepared.
    command = [a for a in launch_command(copy, "--mode", "eval")
               if a not in ("--config", TINY)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 3
    assert "holds no prepared data set; run --mode prepare first" in done.stderr
    assert files() == before  # export, predict and eval wrote only their own outputs

    # Bad input: no run; an export of another model.
    with pytest.raises(CheckpointUnavailable, match=r"no trained run in .*empty"):
        inference.export(str(tmp_path / "empty"))
    description["class_names"] = ["a", "b", "c"]
    (copy / "export" / "model.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointUnavailable,
                       match=r"student.safetensors does not fit model 'densenet_small' with 3 "
                             r"classes .*classifier"):
        load_model(str(copy))


def test_a_damaged_export_is_refused_naming_the_file(trained, tmp_path):
    """One flipped byte in an exported weights file: `load_model` refuses it (its SHA-256,
    recorded in model.json at export, no longer matches) instead of serving wrong weights."""
    import shutil

    from crckd_jax import inference, load_model
    from crckd_jax.errors import CheckpointUnavailable

    workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    shutil.copy(workdir / "config.json", copy / "config.json")
    inference.export(str(copy), log=lambda _: None)
    load_model(str(copy))  # intact
    weights = copy / "export" / "student.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointUnavailable, match=r"student.safetensors is damaged: its "
                                                    r"SHA-256 is not the one .*model.json"):
        load_model(str(copy))
