"""Start-up time: from `python launch.py` to the first finished train step.

Runs the job twice in fresh workdirs that share one empty persistent compilation cache:
the first start compiles everything (cold), the second finds the compiled executables in
the cache (warm). The data is prepared once beforehand: the synthetic images are generated
in a shared folder (`data.dir`) and the TFDS data set is built in another (`data.tfds_dir`),
as a real data set is prepared once, so both starts do the same work: listing the images,
finding the stored data set, writing the folds, building the model and state, compiling (or
loading) the step, and one step. Each run is stopped as soon as its first train record appears.

    python benchmarks/startup.py [--config configs/demo.py] [--model densenet121]
        [--image-size 224] [--batch-size 16] [--xla-options default|none|onednn]

--model, --image-size and --batch-size override the config's (the synthetic images are
generated at --image-size). Besides the times, it counts the executables each start wrote
to the cache (JAX writes one entry per compiled executable; a warm start that writes none
compiled nothing that the cache could hold) and reports the cache's size.
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


def cache_entries(cache: str) -> set[str]:
    path = pathlib.Path(cache)
    return {p.name for p in path.iterdir() if p.name.endswith("-cache")} if path.exists() else set()


def time_to_first_step(command: list[str], workdir: pathlib.Path, env: dict) -> float:
    records = workdir / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(command + ["--workdir", str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    parser.add_argument("--model", default=None, help="model.name override")
    parser.add_argument("--image-size", type=int, default=None,
                        help="data.image_size and data.synthetic_image_size override")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size override")
    parser.add_argument("--xla-options", default=None,
                        help="CRCKD_XLA_OPTIONS of the runs (default|none|onednn)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    overrides = []
    if args.model:
        overrides.append(f"--config.model.name={args.model}")
    if args.image_size:
        overrides += [f"--config.data.image_size={args.image_size}",
                      f"--config.data.synthetic_image_size={args.image_size}"]
    if args.batch_size:
        overrides.append(f"--config.train.batch_size={args.batch_size}")
    env = dict(os.environ)
    if args.xla_options:
        env["CRCKD_XLA_OPTIONS"] = args.xla_options
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data, cache = str(tmp / "tfds"), str(tmp / "cache")
        base = [sys.executable, str(ROOT / "launch.py"), "--config", args.config, *overrides,
                f"--config.data.dir={tmp / 'images'}", f"--config.data.tfds_dir={data}"]
        subprocess.run(base + ["--workdir", str(tmp / "prepared"), "--mode", "prepare"],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        run = base + ["--config.train.log_every_steps=1",
                      f"--config.train.compilation_cache_dir={cache}"]
        cold = time_to_first_step(run, tmp / "cold", env)
        after_cold = cache_entries(cache)
        warm = time_to_first_step(run, tmp / "warm", env)
        after_warm = cache_entries(cache)
        size_mb = sum(p.stat().st_size for p in pathlib.Path(cache).iterdir()) / 2**20 \
            if pathlib.Path(cache).exists() else 0.0
    written_cold, written_warm = len(after_cold), len(after_warm - after_cold)
    print(f"first step after start: cold cache {cold:.1f} s, warm cache {warm:.1f} s "
          f"(ratio {cold / warm:.2f}); executables written to the cache: cold start "
          f"{written_cold}, warm start {written_warm}; cache {size_mb:.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cold_s": cold, "warm_s": warm, "written_cold": written_cold,
                       "written_warm": written_warm, "cache_mb": size_mb,
                       "args": vars(args)}, f, indent=1)
    print(f"RESULT cold_s={cold:.1f} warm_s={warm:.1f} written_cold={written_cold} "
          f"written_warm={written_warm}")


if __name__ == "__main__":
    main()
