"""Several processes through `jax.distributed`: `launch.py --config configs/demo.py:tiny` run
by two processes on localhost (2 fake CPU devices each) equals one process with 4 fake
devices, and the checkpoints the two processes write are restored by one process.

The runs are subprocesses (the device count and `jax.distributed` are fixed when JAX
starts); the one-process run and the two processes start together.

Measured differences, two processes vs one (same global batch, same 4 devices): the
summary metrics are identical; the logged training losses agree to ~2e-5 relative; the
checkpointed parameters to ~2e-5 (relative L2 norm of the difference), memory and BatchNorm
statistics to ~2e-6. They are not bit-identical: the optimised HLO of the step is the same
except for the number of parallel parts XLA's CPU compiler splits some fused loops into
(`outer_dimension_partitions`), which differs when a process holds 2 devices instead of 4,
and with identical inputs the forward pass's logits then differ by a few 1e-6; and gloo
sums across processes in another order than the in-process all-reduce. Asserted: metrics
within 1e-6, losses within 1e-4 relative, parameters within 1e-3 and memory / statistics
within 1e-4 (relative L2).
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crckd_jax import cli, distributed  # noqa: F401  (cli defines its flags on import)
from crckd_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "demo.py") + ":tiny"

TRAIN_TERMS = ("loss", "ce", "mt", "ccd", "crp", "z_student", "z_teacher")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir, cache, *flags):
    return [sys.executable, str(ROOT / "launch.py"), "--config", TINY, "--workdir",
            str(workdir), f"--config.train.compilation_cache_dir={cache}",
            "--config.train.checkpoint_every_steps=1", *flags]


def environment(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def start_single(workdir, cache, *flags, devices=4):
    return subprocess.Popen(command(workdir, cache, *flags), cwd=ROOT, env=environment(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_pair(workdir, cache, *flags):
    address = f"127.0.0.1:{free_port()}"
    return [subprocess.Popen(
        command(workdir, cache, *flags, "--coordinator_address", address,
                "--num_processes", "2", "--process_id", str(i)),
        cwd=ROOT, env=environment(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]


def finish(procs, timeout=600):
    """Waits for every process; on a failure kills the rest and shows their stderr."""
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for code, out, err in outputs:
        assert code == 0, err[-4000:]
    return [out for _, out, _ in outputs]


def read_checkpoint(workdir, step):
    """(state as numpy, data iterator state, meta) of one step, whatever devices wrote it."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step)
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path / "state").item_metadata.tree
    state = checkpointer.restore(path / "state", restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    read = lambda item: json.loads((path / item / "metadata").read_text())
    return state, read("data"), read("meta")


def relative_l2(a, b):
    x = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(a)])
    y = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(b)])
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def train_records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def assert_same_run(multi, single, *, params=1e-3, other=1e-4):
    """Summary, logged losses and checkpoints of two runs of the same global batches."""
    a = json.loads((multi / "summary.json").read_text())
    b = json.loads((single / "summary.json").read_text())
    for view in ("final", "mean_last_11"):
        assert a[view].keys() == b[view].keys()
        for key in a[view]:
            assert a[view][key] == pytest.approx(b[view][key], abs=1e-6), (view, key)
    ra, rb = train_records(multi), train_records(single)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb):
        for key in TRAIN_TERMS:
            # gloo's all-reduce sums the gradients in another order than one process does:
            # parameters differ by ~2e-5 (relative) after the first Adam step, which moves the
            # small CRP term (~0.03) by a few 1e-6; the floor is 1e-5 of a loss of order 1.
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (x["step"], key)
    steps = sorted(int(p.name) for p in (single / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == sorted(int(p.name) for p in (multi / "checkpoints").iterdir()
                           if p.name.isdigit())
    for step in steps:
        sa, da, ma = read_checkpoint(multi, step)
        sb, db, mb = read_checkpoint(single, step)
        assert int(sa["step"]) == int(sb["step"]) == step
        np.testing.assert_array_equal(sa["rng"], sb["rng"])
        for part in ("params", "ema_params"):
            assert relative_l2(sa[part], sb[part]) < params, (step, part)
        for part in ("memory", "batch_stats", "ema_batch_stats"):
            assert relative_l2(sa[part], sb[part]) < other, (step, part)
        # The iterator state counts this process's rows; converted, it is the same position.
        assert pipeline.rescale_iterator_state(
            da, 8, ma.get("process_count", 1), mb.get("process_count", 1)) == db


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 4 devices and two processes with 2 each, started together."""
    root = tmp_path_factory.mktemp("multihost")
    single, multi = root / "single", root / "multi"
    procs = [start_single(single, root / "cache_single"),
             *start_pair(multi, root / "cache_multi")]
    outputs = finish(procs)
    return root, single, multi, outputs


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(runs):
    root, single, multi, outputs = runs
    assert "process 0 of 2 (flags): 2 local of 4 devices" in outputs[1]
    assert "process 1 of 2 (flags): 2 local of 4 devices" in outputs[2]
    assert " of 2 (flags)" not in outputs[0]  # the single run started no service
    # Only process 0 wrote the run's files (one copy of each record).
    steps = [r["step"] for r in train_records(multi)]
    assert steps == sorted(set(steps))
    for name in ("summary.json", "metrics.jsonl"):
        assert (multi / name).exists()
    assert (multi / "report" / "confusion_matrix.png").exists()
    assert_same_run(multi, single)
    _, _, meta = read_checkpoint(multi, 1)
    assert meta["process_count"] == 2


@pytest.mark.slow
def test_checkpoint_of_two_processes_restored_by_one(runs):
    root, single, multi, _ = runs
    # Evaluation of the two processes' last checkpoint in one process.
    finish([start_single(multi, root / "cache_single", "--mode", "eval")])
    evaluated = json.loads((multi / "eval.json").read_text())["test"]
    final = json.loads((single / "summary.json").read_text())["final"]
    for key, value in final.items():
        assert evaluated[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_training_of_two_processes_resumed_by_one(runs):
    root, single, multi, _ = runs
    # From the two processes' checkpoint of step 1: the iterator state is converted.
    resumed = root / "resumed"
    shutil.copytree(multi, resumed, ignore=shutil.ignore_patterns("2", "summary.json",
                                                                   "eval.json", "report"))
    out = finish([start_single(resumed, root / "cache_single")])[0]
    assert "resumed from step 1" in out
    assert_same_run(resumed, single)


@pytest.mark.slow
def test_two_processes_with_pmap_equal_one_process(runs, tmp_path):
    root, single, _, _ = runs
    multi = tmp_path / "multi_pmap"
    finish(start_pair(multi, tmp_path / "cache", "--config.parallel.backend=pmap"))
    assert_same_run(multi, single)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption service makes both processes stop after
    the same step, which process 0 checkpoints; both exit with 75."""
    flags = ("--config.train.epochs=2", "--config.train.steps_per_epoch=40",
             "--config.train.checkpoint_every_steps=0", "--config.train.log_every_steps=1")
    workdir = tmp_path / "multi"
    procs = start_pair(workdir, tmp_path / "cache", *flags)
    metrics_file = workdir / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics_file.exists() and '"split": "train"' in metrics_file.read_text():
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stopped = []
    for code, err in results:
        assert code == 75, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: stopped by SIGTERM after step "), last
        stopped.append(int(last.split("after step ")[1].split()[0]))
    assert stopped[0] == stopped[1] < 80
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped[0]


def test_cluster_environment_from_launcher_variables():
    detect = distributed.cluster_environment
    assert detect({}) is None
    assert detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert detect({**slurm, "SLURM_NTASKS": "8"}) == "SLURM"
    assert detect({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: a plain run
    assert detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) is None  # salloc, no srun
    assert detect({"OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"
    assert detect({"OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert detect({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == "Cloud TPU"
    assert detect({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    # No flags and no launcher: nothing is started.
    assert distributed.initialize_distributed(None, None, None, environ={}) is None
    assert distributed.initialize_distributed(None, 1, None, environ={}) is None
