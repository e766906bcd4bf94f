"""Images/s of K folds' train steps side by side (one program, `jax.vmap` over a leading
fold axis) against one fold's step, on this machine.

    python benchmarks/fold_stack.py [--model densenet_small] [--image-size 64]
        [--batch-size 16] [--folds 5] [--memory queue] [--steps 5] [--rounds 3]

Both programs are the trainer's (`builder.build_run`, the device augmentation from uint8
images): `Run.train_step` and `Run.folds_train_step`, which `parallel.folds_side_by_side=K`
trains with (K copies of the state and K class-weight vectors stacked, K batches). After compiling both, they are timed in interleaved rounds (--steps steps of one,
then of the other), so both see the same machine load. images/s counts every fold's batch.
The last line: `RESULT one_img_s=<x> stacked_img_s=<y> ratio=<y/x> folds=<K>`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="densenet_small")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="per fold")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--memory", choices=("bank", "queue"), default="queue")
    p.add_argument("--num-items", type=int, default=400, help="training items per fold")
    p.add_argument("--num-positives", type=int, default=4)
    p.add_argument("--num-negatives", type=int, default=256)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and program")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import numpy as np

    from crckd_jax import builder, xla_options
    from step_time import benchmark_settings, class_counts

    xla_options.configure()
    settings = benchmark_settings(args, batch_size=args.batch_size, dtype=args.dtype,
                                  memory=args.memory, queue_capacity=args.num_items // 5)
    run = builder.build_run(settings, builder.DataDescription.from_counts(
        class_counts(args.num_items)))
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.image_size, args.image_size, 3)

    def host_batch():
        index = rng.choice(args.num_items, args.batch_size, replace=False).astype(np.int32)
        return {"image": rng.integers(0, 256, shape, np.uint8),
                "label": np.asarray(run.data.train_labels)[index], "index": index}

    k = args.folds
    stack = lambda *xs: np.stack(xs)  # noqa: E731
    one = {"state": run.parallel.put_state(run.initial_state),
           "batch": run.parallel.put_batch(host_batch()),
           "step": run.train_step, "weight": run.step_class_weight}
    stacked = {"state": run.parallel.put_state(jax.tree.map(stack, *[run.initial_state] * k)),
               "batch": tuple(run.parallel.put_batch(host_batch()) for _ in range(k)),
               "step": run.folds_train_step,
               "weight": run.parallel.put_state(stack(*[run.class_weight] * k))}
    for part in (one, stacked):  # compile and warm up
        t0 = time.perf_counter()
        part["state"], metrics = part["step"](part["state"], part["batch"], part["weight"])
        jax.block_until_ready(metrics)
        part["first_s"] = time.perf_counter() - t0
        part["times"] = []
    for _ in range(args.rounds):
        for part in (one, stacked):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                part["state"], metrics = part["step"](part["state"], part["batch"],
                                                      part["weight"])
            jax.block_until_ready((part["state"], metrics))
            part["times"].append((time.perf_counter() - t0) / args.steps)
    one_img_s = args.batch_size / statistics.median(one["times"])
    stacked_img_s = k * args.batch_size / statistics.median(stacked["times"])
    ratios = [k * a / b for a, b in zip(one["times"], stacked["times"])]
    print(f"{args.model}, {args.image_size} px, {args.batch_size} per fold, {args.dtype}, "
          f"{args.memory} memory, on {jax.devices()[0].platform}")
    print(f"one fold: {one_img_s:.1f} img/s (first call {one['first_s']:.1f} s); "
          f"{k} folds side by side: {stacked_img_s:.1f} img/s (first call "
          f"{stacked['first_s']:.1f} s); per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"RESULT one_img_s={one_img_s:.1f} stacked_img_s={stacked_img_s:.1f} "
          f"ratio={stacked_img_s / one_img_s:.2f} folds={k}")
    return {"one_img_s": one_img_s, "stacked_img_s": stacked_img_s, "folds": k}


if __name__ == "__main__":
    main()
