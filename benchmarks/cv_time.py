"""`--mode cv` against its folds trained one by one, and the compiles of `--mode table`.

Prepares the data once, then, each start with an empty persistent compilation cache of its
own:

1. `--mode train` of fold 0 twice in fresh workdirs sharing one cache: the first start
   compiles (cold), the second reads every executable from the cache (warm: the wall time
   of one fold without its compiles, the baseline);
2. `--mode cv` over the k folds in one start (cold);
3. with `--side-by-side K`, `--mode cv` again with `parallel.folds_side_by_side=K` (cold);
4. with `--share N`, `--mode cv --share_workdir` in N processes started together (cold, one
   cache);
5. with `--table`, `--mode table` over every rung of `table.rungs` and the k folds (cold).

It prints the wall times, cv / (k x warm fold), side by side / one by one, and how many
train-step executables each start wrote to its cache (JAX writes one entry per compiled
executable; the train step's are named `jit_train_with_lr-*`, the side-by-side step's
`jit_train_side_by_side-*`).

    python benchmarks/cv_time.py [--config configs/demo.py] [--epochs 8] [--table]
        [--side-by-side 5] [--share 2]
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_step_entries(cache: pathlib.Path) -> int:
    """Train-step executables in the persistent compilation cache `cache`."""
    return sum(len(list(cache.glob(f"{name}-*")))
               for name in ("jit_train_with_lr", "jit_train_side_by_side"))


def launch(args, workdir: pathlib.Path, cache: pathlib.Path, *flags: str,
           processes: int = 1) -> float:
    """Wall seconds of `processes` `launch.py` starts at once (raises if one fails)."""
    command = [sys.executable, str(ROOT / "launch.py"), "--config", args.config,
               "--workdir", str(workdir), f"--config.train.epochs={args.epochs}",
               f"--config.train.compilation_cache_dir={cache}",
               f"--config.data.dir={workdir.parent / 'images'}",
               f"--config.data.tfds_dir={workdir.parent / 'tfds'}",
               "--config.train.write_report=false", *flags]
    start = time.perf_counter()
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT) for _ in range(processes)]
    for process in started:
        _, err = process.communicate()
        if process.returncode:
            sys.exit(f"error: {' '.join(command)} failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    p.add_argument("--epochs", type=int, default=8, help="train.epochs of every run")
    p.add_argument("--table", action="store_true", help="also run --mode table")
    p.add_argument("--side-by-side", type=int, default=0,
                   help="also run --mode cv with this many folds side by side")
    p.add_argument("--share", type=int, default=0,
                   help="also run --mode cv in this many processes sharing the workdir")
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = p.parse_args(argv)
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="cv_time_"))
    root.mkdir(parents=True, exist_ok=True)
    launch(args, root / "prepared", root / "cache_prepare", "--mode", "prepare")

    cache = root / "cache_fold"
    cold = launch(args, root / "fold_cold", cache, "--config.data.fold=0")
    warm = launch(args, root / "fold_warm", cache, "--config.data.fold=0")
    fold_compiles = train_step_entries(cache)
    cv = launch(args, root / "cv", root / "cache_cv", "--mode", "cv")
    folds = len(list((root / "cv").glob("fold_*/summary.json")))
    print(f"config {args.config}, {args.epochs} epochs, {folds} folds, in {root}")
    print(f"fold 0 alone: {cold:.1f} s cold, {warm:.1f} s warm "
          f"({fold_compiles} train step compiled)")
    print(f"--mode cv: {cv:.1f} s, {train_step_entries(root / 'cache_cv')} train step(s) "
          f"compiled; cv / ({folds} x warm fold) = {cv / (folds * warm):.3f}")
    if args.side_by_side:
        flag = f"--config.parallel.folds_side_by_side={args.side_by_side}"
        together = launch(args, root / "cv_side_by_side", root / "cache_side_by_side",
                          "--mode", "cv", flag)
        print(f"--mode cv, {args.side_by_side} folds side by side: {together:.1f} s, "
              f"{train_step_entries(root / 'cache_side_by_side')} train step(s) compiled; "
              f"side by side / one by one = {together / cv:.3f}")
    if args.share:
        shared = launch(args, root / "cv_shared", root / "cache_shared", "--mode", "cv",
                        "--share_workdir", processes=args.share)
        print(f"--mode cv, {args.share} processes sharing the workdir: {shared:.1f} s, "
              f"{train_step_entries(root / 'cache_shared')} train step(s) compiled; "
              f"shared / one process = {shared / cv:.3f}")
    if args.table:
        table = launch(args, root / "table", root / "cache_table", "--mode", "table")
        units = len(list((root / "table").glob("*/seed_*/fold_*/summary.json")))
        print(f"--mode table: {table:.1f} s for {units} units, "
              f"{train_step_entries(root / 'cache_table')} train step(s) compiled")


if __name__ == "__main__":
    main()
