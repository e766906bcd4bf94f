"""Batch normalisation with PyTorch ``BatchNorm2d`` numerics.

Differences from ``flax.linen.BatchNorm`` that matter for checkpoint and training parity:

* momentum follows torch's convention: ``running <- (1 - momentum) * running + momentum * batch``;
* the running variance is updated with the unbiased batch variance (divisor ``n - 1``, where
  ``n`` is the number of reduced elements over all devices), while the output is normalised
  with the biased one (divisor ``n``);
* statistics are always computed in float32, whatever the compute ``dtype``.

Variance is computed in two passes (global mean first, then the mean of squared deviations),
as torch does on CPU (its CUDA kernels use Welford, equally stable), instead of
``E[x^2] - E[x]^2``, which loses all precision in float32 when ``|mean| >> std``. With
``axis_name`` each pass is one ``lax.psum`` over the named axis of per-device sums (the
element count is psum'd statically), so ``N`` devices with synchronised statistics compute
the same numbers as one device holding the global batch, up to summation order. The price
is two small all-reduces of [C] vectors per layer instead of one.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax import lax


class BatchNorm(nn.Module):
    """Batch norm over all axes but the last (channels), with torch semantics.

    Attributes:
      use_running_average: if True, normalise with the stored running statistics (eval mode);
        if False, with batch statistics, updating the running ones (train mode; call ``apply``
        with ``mutable=['batch_stats']``). May instead be passed to ``__call__``.
      axis_name: mapped axis (``pmap``/``vmap``/``shard_map``) over which batch statistics are
        synchronised; None for per-device statistics.
      momentum: torch-style momentum (weight of the new batch statistic).
      epsilon: added to the variance before the square root.
      dtype: dtype of the output; statistics and normalisation run in float32.

    Variables: params ``scale`` [C] (init 1) and ``bias`` [C] (init 0); batch_stats ``mean``
    [C] (init 0) and ``var`` [C] (init 1), all float32. Running statistics are not updated
    during ``init``.
    """

    use_running_average: bool | None = None
    axis_name: str | None = None
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None) -> jnp.ndarray:
        """Normalises ``x`` [..., C]; returns an array of the same shape in ``self.dtype``."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32)
        )

        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            count = 1
            for axis in axes:
                count *= x.shape[axis]
            total_sum = jnp.sum(x32, axis=axes)
            if self.axis_name is not None:
                # psum of a Python int is static: the global count stays a Python number.
                count = lax.psum(count, self.axis_name)
                total_sum = lax.psum(total_sum, self.axis_name)
            if count < 2:
                raise ValueError(
                    f"BatchNorm in training mode needs more than 1 value per channel, got "
                    f"input shape {x.shape}"
                )
            mean = total_sum / count
            sq_dev_sum = jnp.sum(jnp.square(x32 - mean), axis=axes)
            if self.axis_name is not None:
                sq_dev_sum = lax.psum(sq_dev_sum, self.axis_name)
            var = sq_dev_sum / count
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = (1.0 - m) * running_mean.value + m * lax.stop_gradient(mean)
                unbiased_var = lax.stop_gradient(sq_dev_sum) / (count - 1)
                running_var.value = (1.0 - m) * running_var.value + m * unbiased_var

        mul = scale * lax.rsqrt(var + self.epsilon)
        return ((x32 - mean) * mul + bias).astype(self.dtype)
