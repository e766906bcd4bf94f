"""The mean teacher: EMA of the student's parameters and the teacher's input view."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_alpha(step: jax.Array, decay: float) -> jax.Array:
    """`min(1 - 1 / (step + 1), decay)`: 0 at step 0, so the first update copies the student."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (step + 1.0), decay)


def ema_update(teacher_params, student_params, step: jax.Array, decay: float):
    """`alpha * teacher + (1 - alpha) * student` leaf by leaf (parameters only)."""
    alpha = ema_alpha(step, decay)
    return jax.tree.map(lambda t, s: alpha * t + (1.0 - alpha) * s,
                        teacher_params, student_params)


def rotate_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    """A random multiple of 90 degrees and a random horizontal flip of one image [H, W, C].

    H must equal W. The reference gives its teacher such a transformed second view.
    """
    k_rot, k_flip = jax.random.split(key)
    turns = jax.random.randint(k_rot, (), 0, 4)
    rotated = jax.lax.switch(turns, [lambda x, k=k: jnp.rot90(x, k) for k in range(4)], image)
    return jnp.where(jax.random.bernoulli(k_flip), rotated[:, ::-1], rotated)
