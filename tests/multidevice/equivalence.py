"""Run a few CRCKD steps on 1 device and on N fake CPU devices; print max differences.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=N python equivalence.py N KIND BACKENDS
[FORMS]
KIND: queue | bank (BatchNorm synchronised over the devices) | queue-groups (BatchNorm in
groups of BATCH / N items, running statistics of the first group: one device with N groups
against N devices with one group each, the reference's DataParallel). FORMS: `both`
(default: uint8 images augmented in the step, alternating with views made on the host) or
`uint8` (the default data path only: one compile per backend instead of two).
Prints one JSON line: {"<backend>": {"params": err, "memory": err, "loss": err, ...}}.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from crckd_jax import config as config_lib
from crckd_jax import losses, xla_options
from crckd_jax.memory import BankMemory, QueueMemory
from crckd_jax.models.batch_norm import BatchNormSettings
from crckd_jax.models.densenet import CRCKDNet, densenet_config
from crckd_jax.models.networks import Networks
from crckd_jax.optim import make_optimizer
from crckd_jax.parallel import AXIS, DataParallel
from crckd_jax.state import create_train_state
from crckd_jax.settings import Settings
from crckd_jax.step import StepConfig, make_train_step

NUM_CLASSES, BATCH, SIZE, N_TRAIN, DIM, STEPS = 3, 8, 32, 32, 16, 3
TRAIN_LABELS = np.arange(N_TRAIN) % NUM_CLASSES


def networks_and_optimizer(kind, axis_name, num_devices, dtype=jnp.float32):
    group = BATCH // num_devices if kind == "queue-groups" else 0
    bn = BatchNormSettings(axis_name=None if group else axis_name, group_size=group)
    model = CRCKDNet(densenet_config("densenet_tiny"), NUM_CLASSES, hidden_dim=32, bn=bn,
                     dtype=dtype)
    return Networks(model, DIM), make_optimizer(total_steps=10, max_lr=1e-3), group


def initial_state(kind):
    """The state every run starts from (created once: the BatchNorm settings of the runs
    change their steps, not the parameters)."""
    networks, optimizer, _ = networks_and_optimizer(kind, None, 1)
    if kind.startswith("queue"):
        make_memory = lambda k: QueueMemory.create(k, NUM_CLASSES, 8, DIM)
    else:
        make_memory = lambda k: BankMemory.create(k, TRAIN_LABELS, NUM_CLASSES, DIM)
    return create_train_state(jax.random.key(0), networks, optimizer, make_memory,
                              (SIZE, SIZE, 3))


def train_step(kind, axis_name, num_devices=1, dtype=jnp.float32):
    """The per-device step of `kind` with BatchNorm settings for `num_devices`."""
    networks, optimizer, group = networks_and_optimizer(kind, axis_name, num_devices, dtype)
    settings = config_lib.default_config()
    settings.loss.preset = "paper"
    settings.memory.update(num_positives=3, num_negatives=10, embed_dim=DIM)
    settings.train.batch_size = BATCH
    settings.model.bn_group_size = group
    config = StepConfig.from_settings(Settings.from_dict(settings.to_dict()), steps_per_epoch=5,
                                      axis_name=axis_name)
    return functools.partial(make_train_step(networks, optimizer, config),
                             class_weight=losses.class_weights(np.bincount(TRAIN_LABELS)))


def setup(kind, axis_name, dtype=jnp.float32, num_devices=1):
    """(initial state, per-device train step) of `kind`, the step computing in `dtype`."""
    return initial_state(kind), train_step(kind, axis_name, num_devices, dtype)


def batches(forms="both"):
    """With forms 'both': odd steps uint8 images augmented inside the step (the default),
    even steps views made on the host; with 'uint8': uint8 images at every step."""
    rng = np.random.default_rng(0)
    for i in range(STEPS):
        index = rng.choice(N_TRAIN, BATCH, replace=False).astype(np.int32)
        batch = {"label": TRAIN_LABELS[index].astype(np.int32), "index": index}
        if i % 2 or forms == "uint8":
            batch["image"] = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8)
        else:
            batch["image_student"] = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
            batch["image_teacher"] = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
        yield batch


def max_rel(a, b, floor=1e-30):
    """The largest |a - b| of a leaf over max(max |b| of the leaf, `floor`), worst leaf."""
    errs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                  / max(float(np.max(np.abs(np.asarray(y, np.float64)))), floor))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(errs)


# Parameters are compared relative to at least 1e-2: a leaf that grew from 0 in three steps
# (a BatchNorm bias, ~1e-3) has entries whose gradient nearly cancels, and Adam's update of
# such an entry, lr * g / (|g| + eps) with |g| ~ eps, follows the rounding of that sum over
# devices; an absolute 1e-5 is still a fraction of the smallest step (lr >= 4e-5 here).
PARAM_FLOOR = 1e-2


def main(num_devices, kind, backends, forms):
    initial = initial_state(kind)
    state, step = initial, jax.jit(train_step(kind, None, num_devices))
    ref_losses = []
    for b in batches(forms):
        state, m = step(state, b)
        ref_losses.append(float(m["loss"]))
    reference = jax.tree.map(np.asarray, state)
    report = {}
    for backend in backends:
        dp = DataParallel(backend, jax.devices()[:num_devices])
        compiled = dp.compile(train_step(kind, AXIS, num_devices))
        state = dp.put_state(initial)  # copies: the compiled step donates them
        got_losses = []
        for b in batches(forms):
            state, m = compiled(state, dp.put_batch(b))
            got_losses.append(float(dp.get_outputs(m)["loss"]))
        # Every device holds the same memory, bit for bit.
        if backend == "pmap":
            copies = [jax.tree.map(lambda x: np.asarray(x[i]), state.memory)
                      for i in range(num_devices)]
        else:
            copies = [[np.asarray(s.data) for s in leaf.addressable_shards]
                      for leaf in jax.tree.leaves(state.memory)]
            copies = [[leaf[i] for leaf in copies] for i in range(num_devices)]
        identical = all(np.array_equal(x, y) for c in copies[1:]
                        for x, y in zip(jax.tree.leaves(copies[0]), jax.tree.leaves(c)))
        final = jax.tree.map(np.asarray, dp.get_state(state))
        report[backend] = {
            "loss": max_rel(got_losses, ref_losses),
            "params": max_rel(final.params, reference.params, PARAM_FLOOR),
            "ema_params": max_rel(final.ema_params, reference.ema_params, PARAM_FLOOR),
            "batch_stats": max_rel(final.batch_stats, reference.batch_stats),
            "memory": max_rel(final.memory, reference.memory),
            "memory_identical_on_devices": identical,
            "losses": got_losses,
            "state": jax.tree.map(np.asarray, final),
        }
    if len(backends) == 2:
        a, b = (report[k]["state"] for k in backends)
        report["pmap_vs_shard_map"] = max_rel(a, b)
        # Per part of the state: the largest relative difference, and whether bit-identical.
        report["pmap_vs_shard_map_parts"] = {
            part: {"max_rel": max_rel(getattr(a, part), getattr(b, part)),
                   "identical": all(np.array_equal(x, y) for x, y in zip(
                       jax.tree.leaves(getattr(a, part)), jax.tree.leaves(getattr(b, part))))}
            for part in ("params", "ema_params", "opt_state", "memory", "batch_stats",
                         "ema_batch_stats")}
        report["pmap_vs_shard_map_losses_identical"] = (
            report[backends[0]]["losses"] == report[backends[1]]["losses"])
    for r in report.values():
        if isinstance(r, dict):
            r.pop("state", None)
            r.pop("losses", None)
    print(json.dumps(report))


if __name__ == "__main__":
    xla_options.enable_compilation_cache()  # $JAX_COMPILATION_CACHE_DIR or the default
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","),
         sys.argv[4] if len(sys.argv) > 4 else "both")
