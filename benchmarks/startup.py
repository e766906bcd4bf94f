"""Start-up time: from `python launch.py` to the first finished train step of the demo.

Runs the demo twice in fresh workdirs that share one empty persistent compilation cache:
the first start compiles everything (cold), the second finds the compiled step in the cache
(warm). The TFDS data set is built once beforehand in a shared folder, so both starts do the
same work: generating and listing the synthetic images and writing the folds (the stored
data set is reused), building the model and state, compiling (or loading) the step, and
one step. Each run is stopped as soon as its first train record appears.

    python benchmarks/startup.py [--config configs/demo.py]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def time_to_first_step(config: str, workdir: pathlib.Path, cache: str, data: str) -> float:
    command = [sys.executable, str(ROOT / "launch.py"), "--config", config,
               "--workdir", str(workdir), "--config.train.log_every_steps=1",
               f"--config.train.compilation_cache_dir={cache}", f"--config.data.tfds_dir={data}"]
    records = workdir / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            if records.exists() and any(json.loads(line)["split"] == "train"
                                        for line in records.read_text().splitlines()):
                return time.perf_counter() - start
            time.sleep(0.05)
        raise RuntimeError(f"launch.py ended before its first step: {proc.stderr.read()[-2000:]}")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data, cache = str(tmp / "tfds"), str(tmp / "cache")
        subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", args.config,
                        "--workdir", str(tmp / "prepared"), "--mode", "prepare",
                        f"--config.data.tfds_dir={data}"], cwd=ROOT, check=True,
                       capture_output=True)
        cold = time_to_first_step(args.config, tmp / "cold", cache, data)
        warm = time_to_first_step(args.config, tmp / "warm", cache, data)
    print(f"first step after start: cold cache {cold:.1f} s, warm cache {warm:.1f} s "
          f"(ratio {cold / warm:.2f})")
    print(f"RESULT cold_s={cold:.1f} warm_s={warm:.1f}")


if __name__ == "__main__":
    main()
