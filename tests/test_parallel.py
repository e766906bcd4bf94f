"""Data parallelism: N fake CPU devices equal one device with the same global batch.

Each case runs `tests/multidevice/equivalence.py` in a fresh interpreter, because the
number of fake devices (XLA_FLAGS) is fixed when JAX starts. BatchNorm statistics are
synchronised across devices there, which is what makes N devices equal one.

Tolerances: the loss agrees to float32 rounding (rtol 1e-5). Parameters after three Adam
steps agree to a relative 1e-3 of each leaf's largest entry: Adam divides by sqrt(v), so
at the first steps an update is ~lr * sign(g), and a gradient component that is ~0 (the
sum over devices is taken in another order than the single-device sum) can flip its
update; measured ~1e-4. The memory rows (unit vectors) and BN statistics: 1e-4.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "multidevice" / "equivalence.py"


def run_equivalence(num_devices, kind, backends):
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    out = subprocess.run([sys.executable, str(SCRIPT), str(num_devices), kind,
                          ",".join(backends)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(report, backends):
    for backend in backends:
        r = report[backend]
        assert r["memory_identical_on_devices"], backend
        assert r["loss"] < 1e-5, r
        assert r["params"] < 1e-3 and r["ema_params"] < 1e-3, r
        assert r["memory"] < 1e-4 and r["batch_stats"] < 1e-4, r


def test_four_devices_queue_shard_map_and_pmap():
    report = run_equivalence(4, "queue", ["shard_map", "pmap"])
    check(report, ["shard_map", "pmap"])
    assert report["pmap_vs_shard_map"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [4, 8])
def test_bank_memory_shard_map(num_devices):
    check(run_equivalence(num_devices, "bank", ["shard_map"]), ["shard_map"])
