"""benchmarks/reference_full_size.py at a reduced DenseNet-121 size (slow; needs torch).

The torch side runs in another interpreter, one that imports torch and numpy:

    CRCKD_TORCH_PYTHON=<python with torch> pytest -m slow tests/test_reference_full_size.py
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = os.environ.get("CRCKD_TORCH_PYTHON")


def _torch_available() -> bool:
    if not TORCH_PYTHON:
        return False
    probe = subprocess.run([TORCH_PYTHON, "-c", "import torch, numpy"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_reference_setting_agrees_with_the_torch_transcription_at_densenet121(tmp_path):
    if not _torch_available():
        pytest.skip("CRCKD_TORCH_PYTHON is not set to an interpreter that imports torch and "
                    "numpy (the reference transcription runs there)")
    # DenseNet-121 (all 58 dense layers, both BatchNorm groups, the double pass), reduced in
    # image side, batch, N and K; float64 on the torch side, so the differences are this
    # project's float32 rounding; the benchmark's per-family tolerances apply
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reference_full_size.py"),
           "--torch-python", TORCH_PYTHON, "--workdir", str(tmp_path), "--dtype", "float64",
           "--image-size", "64", "--batch-size", "8", "--class-counts", "12,8,6,4,3",
           "--epochs", "3", "--steps", "2", "--nce-p", "2", "--nce-k", "16", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    summary = proc.stdout.splitlines()[-1]
    assert summary.startswith("reference_full_size: ") and " 0 failed, 0 families" in summary
