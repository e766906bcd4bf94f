"""The one pytree a CRCKD run carries from step to step, and its creation."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from crckd_jax.distillation import Embed
from crckd_jax.memory import Memory


class TrainState(struct.PyTreeNode):
    """All state of training.

    step: int32 scalar, optimizer steps taken. params: {'student': network parameters,
    'embed_s', 'embed_t': the CCD projections} (what the optimizer updates). batch_stats:
    the student's BatchNorm running statistics. ema_params, ema_batch_stats: the mean
    teacher's network parameters (EMA of params['student']) and its own running statistics.
    opt_state: optax state. memory: the class memory (queue or bank, Z included).
    rng: base PRNG key data (uint32, `jax.random.key_data` form, so checkpoints hold a plain
    array); per-step randomness is derived from it and the step, never stored.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    ema_params: Any
    ema_batch_stats: Any
    opt_state: Any
    memory: Memory
    rng: jax.Array


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    make_memory: Callable[[jax.Array], Memory],
    image_shape: tuple[int, int, int],
    embed_dim: int,
) -> TrainState:
    """A fresh state, created in one compiled call.

    model maps images [B, *image_shape] to {'feature': [B, F], 'logits': [B, C], ...};
    make_memory(key) builds the memory. The teacher has the student's backbone (the
    `features` subtree, which `model.pretrained` loads into both) and a head of its own, as
    the reference's second network has: its first EMA update, at alpha 0, copies the
    student, but its step-0 outputs come from its own head, and they set the teacher-side
    Z and the first teacher memory rows.
    """

    def init(key):
        k_model, k_embed_s, k_embed_t, k_memory, k_run = jax.random.split(key, 5)
        images = jnp.zeros((2, *image_shape), jnp.float32)
        variables = model.init(k_model, images, train=False)
        # Only the head of this second initialisation is kept, and XLA drops the rest: the
        # compiled init stays the size of one network's.
        head = model.init(jax.random.fold_in(k_model, 1), images, train=False)["params"]
        teacher_params = {**head, "features": variables["params"]["features"]}
        feature = jax.eval_shape(
            lambda v: model.apply(v, images, train=False), variables)["feature"]
        dummy = jnp.zeros(feature.shape, jnp.float32)
        params = {
            "student": variables["params"],
            "embed_s": Embed(embed_dim).init(k_embed_s, dummy)["params"],
            "embed_t": Embed(embed_dim).init(k_embed_t, dummy)["params"],
        }
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            ema_params=teacher_params,
            ema_batch_stats=variables["batch_stats"],
            opt_state=optimizer.init(params),
            memory=make_memory(k_memory),
            rng=jax.random.key_data(k_run),
        )

    return jax.jit(init)(rng)
