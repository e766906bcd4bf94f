"""What the training loop costs around the step: loop overhead and end-to-end rate.

    python benchmarks/train_loop.py [--image-size 224] [--batch-size 32] [--steps 60]
    python benchmarks/train_loop.py --real-step --model densenet121 --image-size 224 \
        --batch-size 8 --steps 12

Default (`--trivial-step`): the real trainer loop of `crckd_jax.train` (background prefetch to the
device, deferred metric reads, logging every `--log-every` steps) drives a trivial compiled
step that only reads its batch, so the loop and the input pipeline are all that is timed.
Rows, on a synthetic data set stored at --image-size:
  trivial step alone  the trivial step called back to back on one batch on the device: what
                   the step itself costs (reading a batch of images), to subtract below;
  loop alone       in-memory batches: the loop's cost per step plus the trivial step's
                   (goal: the difference <= 1 ms at batch 32);
  loop + pipeline  the grain pipeline with `data.augment=device` (uint8 batches);
  old loop         the loop of the first version, for comparison: per-step `.item()` of
                   every metric, the batch put on the device after that wait, views made
                   by PIL on the host (`data.augment=host`), with the pipeline and in memory.
Each row gives images/s, wall ms per step and host CPU ms per step (process CPU time of all
threads / steps).

`--real-step`: the real CRCKD step of `--model` through the same loop for --steps steps
(after one compile step), then the same compiled step alone on one batch already on the
device for as many steps, back to back in this process: trainer img/s / step-only img/s
(goal: within 5 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time

import grain
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crckd_jax import config as config_lib  # noqa: E402
from crckd_jax import train  # noqa: E402
from crckd_jax.trainer import build_trainer, load_data  # noqa: E402
from crckd_jax.logger import MetricLogger  # noqa: E402
from crckd_jax.objective import LOSS_KEYS  # noqa: E402
from crckd_jax.parallel import AXIS  # noqa: E402


def make_settings(args, augment_on: str):
    c = config_lib.default_config()
    c.seed = 0
    c.data.source = "synthetic"
    c.data.synthetic_num_images = args.num_images
    c.data.synthetic_image_size = args.image_size
    c.data.image_size = args.image_size
    c.data.augment = augment_on
    c.model.name = args.model
    c.train.batch_size = args.batch_size
    c.train.epochs = 1
    c.train.steps_per_epoch = args.steps + 1  # one untimed first step (compile)
    c.train.log_every_steps = args.log_every
    c.train.checkpoint_every_steps = 0
    c.train.dtype = args.dtype
    c.memory.num_positives = args.num_positives
    c.memory.num_negatives = args.num_negatives
    c.memory.queue_size = args.queue_size
    return config_lib.to_settings(c)


def trivial_step(state, batch, class_weight):
    """Reads every image of the batch (so it must have arrived) and counts the step."""
    images = batch["image"] if "image" in batch else batch["image_student"]
    value = jnp.mean(images.astype(jnp.float32))
    value = jax.lax.pmean(value, AXIS)
    metrics = {k: value for k in LOSS_KEYS}
    return state.replace(step=state.step + 1), {**metrics, "learning_rate": value}


class Timed:
    """Starts the clock when the first step (and its compile) has finished."""

    def __init__(self, step_fn):
        self.step_fn, self.calls, self.start = step_fn, 0, None

    def __call__(self, state, batch, class_weight):
        self.calls += 1
        if self.calls == 2:
            jax.block_until_ready(state)
            self.start = (time.perf_counter(), time.process_time())
        return self.step_fn(state, batch, class_weight)


class StopClock:
    """Stands in for the checkpointer: the loop's one save, after its last step, stops the
    clock once that step has finished (the save itself is not timed)."""

    directory = "(none)"

    def __init__(self):
        self.end = None

    def save(self, step, state, data, meta):
        jax.block_until_ready(state)
        self.end = (time.perf_counter(), time.process_time())

    def latest_step(self):
        return None

    def wait(self):
        pass


def in_memory(dataset, steps):
    """`steps` + 1 copies of the dataset's first batch, as a grain dataset (no read threads)."""
    first = next(iter(dataset))
    no_threads = grain.ReadOptions(num_threads=0)
    return grain.MapDataset.source([first] * (steps + 1)).to_iter_dataset(no_threads)


def new_loop(trainer, dataset, workdir):
    """The trainer's loop, its epoch-end evaluation left out; returns (wall s, cpu s) of the
    timed steps."""
    timed = Timed(trainer.run.train_step)
    trainer = dataclasses.replace(
        trainer, run=dataclasses.replace(trainer.run, train_step=timed))
    clock = StopClock()
    logger = MetricLogger(workdir)
    evaluate, train._evaluate_epoch = train._evaluate_epoch, lambda *a: (None, None)
    batches = trainer.run.parallel.prefetch(dataset, trainer.run.settings.data.device_prefetch)
    fold = train._Fold("", trainer.run.settings, None, trainer, clock, None, logger=logger,
                       batches=batches)
    try:
        lanes = train._Lanes([fold])
        train._train_loop(lanes, lanes.initial_state(), 0)
    finally:
        batches.close()
        train._evaluate_epoch = evaluate
        logger.close()
    return clock.end[0] - timed.start[0], clock.end[1] - timed.start[1]


def old_loop(trainer, dataset, log_every):
    """The first version's loop: every metric read after every step, then the next batch
    read and put on the device; returns (wall s, cpu s) of the timed steps."""
    iterator = iter(dataset)
    state = trainer.run.parallel.put_state(trainer.run.initial_state)
    total = trainer.run.total_steps
    for step in range(1, total + 1):
        if step == 2:
            wall0, cpu0 = time.perf_counter(), time.process_time()
        batch = next(iterator)
        state, terms = trainer.run.train_step(state, trainer.run.parallel.put_batch(batch),
                                              trainer.run.step_class_weight)
        terms = {k: v.item() for k, v in trainer.run.parallel.get_outputs(terms).items()}
        if not all(math.isfinite(terms[k]) for k in LOSS_KEYS):
            raise RuntimeError(f"non-finite loss at step {step}")
        if step % log_every == 0:
            _ = " ".join(f"{k}={v:.4g}" for k, v in terms.items())
    return time.perf_counter() - wall0, time.process_time() - cpu0


def step_alone(trainer, dataset, steps):
    """The compiled step alone on one batch already on the device, `steps` times after one
    untimed call; returns (wall s, cpu s)."""
    batch = trainer.run.parallel.put_batch(next(iter(dataset)))
    state = trainer.run.parallel.put_state(trainer.run.initial_state)
    weight = trainer.run.step_class_weight
    state, metrics = trainer.run.train_step(state, batch, weight)
    jax.block_until_ready(state)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = trainer.run.train_step(state, batch, weight)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - wall0, time.process_time() - cpu0


def report(label, steps, batch, wall, cpu):
    print(f"{label:<38}{steps * batch / wall:>10.1f}{wall / steps * 1e3:>16.2f}"
          f"{cpu / steps * 1e3:>18.2f}", flush=True)
    return steps * batch / wall


def trivial_rows(args, data_dir, tmp):
    print(f'{"loop (trivial step)":<38}{"images/s":>10}{"wall ms/step":>16}'
          f'{"host CPU ms/step":>18}')
    results = {}
    for augment_on, loop in (("device", "new"), ("host", "old")):
        config = make_settings(args, augment_on)
        trainer = build_trainer(config, data_dir, log=lambda _: None)
        trainer = dataclasses.replace(trainer, run=dataclasses.replace(
            trainer.run, train_step=trainer.run.parallel.compile(trivial_step,
                                                                replicated_args=1)))
        if loop == "new":  # the trivial step's own cost, to subtract from the loop rows
            wall, cpu = step_alone(trainer, trainer.train_dataset(), args.steps)
            results["trivial step alone"] = report("trivial step alone", args.steps,
                                                   args.batch_size, wall, cpu)
        for source in ("memory", "pipeline"):
            dataset = trainer.train_dataset()
            if source == "memory":
                dataset = in_memory(dataset, args.steps)
            if loop == "new":
                wall, cpu = new_loop(trainer, dataset, os.path.join(tmp, f"new_{source}"))
                label = "loop alone" if source == "memory" else "loop + pipeline"
            else:
                wall, cpu = old_loop(trainer, dataset, args.log_every)
                label = f"old loop, {'in memory' if source == 'memory' else '+ pipeline'}"
            results[label] = report(label + f" ({augment_on})", args.steps,
                                    args.batch_size, wall, cpu)
    return results


def real_rows(args, data_dir, tmp):
    config = make_settings(args, "device")
    trainer = build_trainer(config, data_dir, log=lambda _: None)
    wall, cpu = new_loop(trainer, trainer.train_dataset(), os.path.join(tmp, "real"))
    print(f'{"CRCKD step":<38}{"images/s":>10}{"wall ms/step":>16}{"host CPU ms/step":>18}')
    trainer_rate = report("trainer loop", args.steps, args.batch_size, wall, cpu)
    cpu_ms_per_image = cpu / (args.steps * args.batch_size) * 1e3
    # The same compiled step alone, on one batch already on the device.
    wall, cpu = step_alone(trainer, trainer.train_dataset(), args.steps)
    step_rate = report("step only", args.steps, args.batch_size, wall, cpu)
    print(f"RESULT trainer_img_s={trainer_rate:.3f} step_img_s={step_rate:.3f} "
          f"ratio={trainer_rate / step_rate:.3f} "
          f"trainer_cpu_ms_per_image={cpu_ms_per_image:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real-step", action="store_true")
    p.add_argument("--model", default="densenet_tiny")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="timed steps per row")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-images", type=int, default=640)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--num-positives", type=int, default=4, help="memory.num_positives (P)")
    p.add_argument("--num-negatives", type=int, default=256, help="memory.num_negatives (K)")
    p.add_argument("--queue-size", type=int, default=32, help="memory.queue_size (rows/class)")
    p.add_argument("--workdir", default="/tmp/crckd_train_loop_benchmark",
                   help="the synthetic data set is prepared (once) here")
    args = p.parse_args()
    print(f"{jax.default_backend()} backend, {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPUs; {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps")
    data_dir = os.path.join(args.workdir, f"data{args.image_size}")
    load_data(make_settings(args, "device"), data_dir, log=lambda _: None)
    with tempfile.TemporaryDirectory() as tmp:
        if args.real_step:
            real_rows(args, data_dir, tmp)
        else:
            trivial_rows(args, data_dir, tmp)


if __name__ == "__main__":
    main()
