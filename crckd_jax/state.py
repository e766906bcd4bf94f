"""The one pytree a CRCKD run carries from step to step, and its creation."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from crckd_jax.memory import Memory
from crckd_jax.models.networks import NETWORK_KEYS, Networks


class TrainState(struct.PyTreeNode):
    """All state of training.

    step: int32 scalar, optimizer steps taken. params: {'student': network parameters,
    'embed_s', 'embed_t': the CCD projections} (`models.networks`; what the optimizer
    updates). batch_stats: the student's BatchNorm running statistics. ema_params,
    ema_batch_stats: the mean teacher's network parameters (EMA of params['student']) and
    its own running statistics. opt_state: optax state. memory: the class memory (queue or
    bank, Z included).
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
    networks: Networks,
    optimizer: optax.GradientTransformation,
    make_memory: Callable[[jax.Array], Memory],
    image_shape: tuple[int, int, int],
) -> TrainState:
    """A fresh state, created in one compiled call: `networks.init` for images of
    `image_shape` [H, W, 3], the optimizer's state, make_memory(key)'s memory."""

    def init(key):
        k_student, k_embed_s, k_embed_t, k_memory, k_run = jax.random.split(key, 5)
        params, batch_stats, teacher_params = networks.init(
            dict(zip(NETWORK_KEYS, (k_student, k_embed_s, k_embed_t))), image_shape)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            ema_params=teacher_params,
            ema_batch_stats=batch_stats,
            opt_state=optimizer.init(params),
            memory=make_memory(k_memory),
            rng=jax.random.key_data(k_run),
        )

    return jax.jit(init)(rng)
