"""The ablation ladder of the paper on the embedded synthetic data.

Trains `configs/demo.py` with the loss terms of each rung (baseline = CE; mt = CE + MT;
mt_ccd = CE + MT + CCD; crckd = all four) for several seeds on the same fold, and writes a
Markdown table of the mean and standard deviation (over seeds) of the test balanced
accuracy, macro F1 and one-vs-rest AUC, each averaged over the last 11 epochs (the
reference's protocol), and of the final epoch.

    python benchmarks/ablation.py --workdir /tmp/ablation --seeds 0,1,2 [--epochs 40]

Each run lives in `<workdir>/<rung>_seed<k>/` and is resumed or reused if it exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crckd_jax import xla_options  # noqa: E402

xla_options.configure()  # before JAX starts, as launch.py does

from crckd_jax import config as config_lib  # noqa: E402
from crckd_jax import protocols  # noqa: E402
from crckd_jax.run_folder import RunFolder  # noqa: E402
from crckd_jax.train import train_and_evaluate  # noqa: E402

RUNGS = ("baseline", "mt", "mt_ccd", "crckd")
METRICS = (("bacc", "balanced accuracy"), ("f1", "macro F1"), ("auc_ovr", "AUC (OvR)"))


def demo_config(rung: str, seed: int, epochs: int | None):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    with config.unlocked():
        protocols.apply_ablation(config, rung)
        config.seed = seed
        if epochs:
            config.train.epochs = epochs
    return config_lib.to_settings(config)


def table(results: dict, view: str) -> list[str]:
    lines = ["| rung | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for rung in RUNGS:
        cells = []
        for key, _ in METRICS:
            values = [s[view][key] for s in results[rung]]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}")
        lines.append(f"| {rung} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=0, help="0 = the demo config's")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {rung: [] for rung in RUNGS}
    start = time.perf_counter()
    for seed in seeds:
        for rung in RUNGS:
            config = demo_config(rung, seed, args.epochs)
            run_dir = os.path.join(args.workdir, f"{rung}_seed{seed}")
            print(f"== {rung}, seed {seed} -> {run_dir}", flush=True)
            results[rung].append(train_and_evaluate(
                config, RunFolder(run_dir, data_dir=args.workdir)))
    config = demo_config("crckd", seeds[0], args.epochs)
    lines = [
        f"Ablation on the synthetic demo data (fold {config.data.fold}, "
        f"{config.train.epochs} epochs, {config.model.name} at {config.data.image_size} px, "
        f"seeds {args.seeds}; mean ± std over seeds):", "",
        "Mean over the last 11 epochs (test fold):", "", *table(results, "mean_last_11"), "",
        "Final epoch (test fold):", "", *table(results, "final"), "",
        f"Wall time: {(time.perf_counter() - start) / 60:.1f} min.",
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
