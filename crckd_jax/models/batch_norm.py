"""Batch normalisation with PyTorch ``BatchNorm2d`` numerics.

Differences from ``flax.linen.BatchNorm`` that matter for checkpoint and training parity:

* momentum follows torch's convention: ``running <- (1 - momentum) * running + momentum * batch``;
* the running variance is updated with the unbiased batch variance (divisor ``n - 1``, where
  ``n`` is the number of reduced elements over all devices), while the output is normalised
  with the biased one (divisor ``n``);
* statistics are always computed in float32, whatever the compute ``dtype``;
* ``group_size`` > 0 computes the batch statistics over groups of that many consecutive items
  of the (per-device) batch, as the reference's ``DataParallel`` replicas of 32 items each
  do, and updates the running statistics from the first group only (the replica on the
  first GPU, whose buffers are the ones that survive);
* a ``mask`` [B] (training mode) leaves the masked items out of the batch statistics (the
  padding of a partial batch): each group's statistics are over its unmasked items only.

Statistics (`batch_statistics`) are one pass over the data: the sums of ``x - K`` and
``(x - K)^2`` per channel, with ``K`` one value of the batch itself (of the first unmasked item;
the mean of those over the devices of ``axis_name``). Shifted this way the variance keeps
its digits when ``|mean| >> std``, where ``E[x^2] - E[x]^2`` loses them all in float32, and
both sums come from one read of the input (one variadic reduction on an NVIDIA GPU:
`sum_pair`) instead of the two that a mean-then-deviations variance needs. With
``axis_name`` the sums are one ``lax.psum`` of per-device sums, so ``N`` devices with
synchronised statistics compute the same numbers as one device holding the global batch, up
to summation order.

Statistics are separate from the normalisation (`normalize`), so a layer whose input is a
concatenation of tensors whose statistics are already known takes them instead of reading
its input again (DenseNet's dense layers: `crckd_jax.models.densenet`): per-channel batch
statistics do not depend on who consumes the channel. Training-mode gradients are written by
hand for both parts: `normalize` needs two reductions of the incoming gradient and one
elementwise pass, `batch_moments` one elementwise pass per tensor, after the cotangents of
all its consumers are summed (vectors of C). Compiled for an H200, DenseNet-121's train step
(224 px, batch 64, bfloat16) went from 3,735 kernels, 49.4 GiB moved (42.1 GiB counting
sliced operands as read) and 2.75 GiB of temporaries with per-layer two-pass statistics to
3,545, 46.7 (34.7) and 2.56; the pairs of sums as one reduction each took the step (no
longer donating its state) from 3,262 kernels to 2,874 (`benchmarks/deviceless.py`,
docs/performance.md). The ``*_autodiff`` variants are the same forward passes differentiated
by JAX, the reference the tests check the hand-written gradients against.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from crckd_jax.collectives import pmean, psum


class Statistics(NamedTuple):
    """Batch statistics of x [B, ..., C] per group of items (G groups; G = 1 without groups).

    mean [G, C] and sq_dev_sum [G, C] (the sum of squared deviations from the mean), float32,
    differentiable; divisor [G]: the values per channel they are over (all items of an empty
    group); count [G]: the unmasked values per channel (0 for an empty group), for the
    running statistics. Over all devices of the axis they were computed with.
    """

    mean: jnp.ndarray
    sq_dev_sum: jnp.ndarray
    divisor: jnp.ndarray
    count: jnp.ndarray


def concat_statistics(parts: list[Statistics]) -> Statistics:
    """The statistics of the channel-wise concatenation of tensors with statistics `parts`
    (same items, so the same divisor and count)."""
    return Statistics(jnp.concatenate([p.mean for p in parts], axis=-1),
                      jnp.concatenate([p.sq_dev_sum for p in parts], axis=-1),
                      parts[0].divisor, parts[0].count)


def batch_statistics(x: jnp.ndarray, mask: jnp.ndarray | None = None,
                     axis_name: str | None = None, group_size: int = 0) -> Statistics:
    """The batch statistics of x [B, ..., C] (any dtype; computed in float32) over the items
    with a True `mask` [B] (all without one), per group of `group_size` consecutive items
    (0: one group), summed over the devices of `axis_name`.

    Raises ValueError for groups that do not divide the batch, groups combined with
    `axis_name`, or fewer than 2 values per channel and group.
    """
    batch = x.shape[0]
    size = group_size or batch
    if group_size and axis_name is not None:
        raise ValueError("BatchNorm group_size > 0 computes per-device statistics; it "
                         f"cannot be combined with axis_name={axis_name!r}")
    if batch % size:
        raise ValueError(f"BatchNorm group_size {size} does not divide the batch of "
                         f"{batch} items")
    groups = x.reshape(batch // size, size, -1, x.shape[-1])  # [G, n, pixels, C]
    values = size * groups.shape[2]
    if (values if axis_name is None else lax.psum(values, axis_name)) < 2:
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel"
                         f"{' and group' if group_size else ''}, got input shape {x.shape}")
    weights = (jnp.ones((batch,), jnp.float32) if mask is None
               else mask.astype(jnp.float32)).reshape(batch // size, size)
    mean, sq_dev_sum, divisor, count = batch_moments(groups, weights, axis_name)
    return Statistics(mean, sq_dev_sum, divisor, count)


def sum_pair(a: jnp.ndarray, b: jnp.ndarray, axes: tuple[int, ...]):
    """(sum of a, sum of b) over `axes` (non-negative) of two float32 arrays of one shape.

    On an NVIDIA GPU one variadic reduction (`_sums_in_one_reduction`): one pass over both, one
    kernel per stage of the reduction, where XLA does not always fuse two sums of one input
    into one kernel. Elsewhere two sums: XLA's CPU backend vectorises a reduction of one array
    but emits a variadic one as a sequential loop, slower and less accurate in float32; TPU and
    ROCm are not measured. Chosen by the platform the program is lowered for
    (`lax.platform_dependent`), so a deviceless compile for a GPU gets the GPU's.
    """
    return lax.platform_dependent(
        a, b, cuda=functools.partial(_sums_in_one_reduction, axes=axes),
        default=functools.partial(_sums_apart, axes=axes))


def _sums_apart(a, b, axes):
    return jnp.sum(a, axis=axes), jnp.sum(b, axis=axes)


def _sums_in_one_reduction(a, b, axes):
    zero = jnp.zeros((), a.dtype)
    return lax.reduce((a, b), (zero, zero), lambda x, y: (x[0] + y[0], x[1] + y[1]), axes)


def _moments(groups, weights, axis_name):
    """(mean, sq_dev_sum, divisor, count, weights used, shift) of groups [G, n, P, C]
    with weights [G, n] of 0/1; a group without any weight 1 uses all its items."""
    x32 = groups.astype(jnp.float32)
    pixels = groups.shape[2]
    count = psum(jnp.sum(weights, axis=1) * pixels, axis_name)  # [G]
    weights = jnp.where((count == 0)[:, None], 1.0, weights)
    divisor = psum(jnp.sum(weights, axis=1) * pixels, axis_name)
    first = jnp.argmax(weights, axis=1)  # the first item that counts, per group
    shift = pmean(jnp.take_along_axis(x32[:, :, 0], first[:, None, None], axis=1)[:, 0],
                  axis_name)  # [G, C]
    centred = x32 - shift[:, None, None]
    w = weights[:, :, None, None]
    sums = psum(sum_pair(w * centred, w * jnp.square(centred), (1, 2)), axis_name)
    offset = sums[0] / divisor[:, None]  # mean - shift
    sq_dev_sum = jnp.maximum(sums[1] - sums[0] * offset, 0.0)
    return shift + offset, sq_dev_sum, divisor, count, weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def batch_moments(groups, weights, axis_name):
    """(mean [G, C], sq_dev_sum [G, C], divisor [G], count [G]) of groups [G, n, P, C] over
    the items with weight 1 of weights [G, n] (`batch_statistics`), with a hand-written
    gradient for mean and sq_dev_sum: one elementwise pass, with the cotangents summed over
    the devices of `axis_name` (the statistics depend on every device's items)."""
    return _moments(groups, weights, axis_name)[:4]


def batch_moments_autodiff(groups, weights, axis_name):
    """`batch_moments` with JAX's differentiation of the same forward pass (the reference
    its hand-written gradient is tested against)."""
    mean, sq_dev_sum, divisor, count, _ = _moments(groups, weights, axis_name)
    return mean, sq_dev_sum, lax.stop_gradient(divisor), lax.stop_gradient(count)


def _moments_fwd(groups, weights, axis_name):
    mean, sq_dev_sum, divisor, count, used = _moments(groups, weights, axis_name)
    return (mean, sq_dev_sum, divisor, count), (groups, used, mean, divisor)


def _moments_bwd(axis_name, residuals, cotangents):
    groups, used, mean, divisor = residuals
    d_mean, d_sq_dev_sum = psum((cotangents[0], cotangents[1]), axis_name)
    # d mean / dx = w / divisor; d sq_dev_sum / dx = 2 w (x - mean).
    centred = groups.astype(jnp.float32) - mean[:, None, None]
    dx = used[:, :, None, None] * ((d_mean / divisor[:, None])[:, None, None]
                                   + 2.0 * d_sq_dev_sum[:, None, None] * centred)
    return dx.astype(groups.dtype), jnp.zeros_like(used)


batch_moments.defvjp(_moments_fwd, _moments_bwd)


def normalize_autodiff(x, statistics, scale, bias, epsilon, dtype):
    """`normalize` with JAX's differentiation (the reference its gradient is tested against)."""
    num_groups = statistics.mean.shape[0]
    groups = x.reshape(num_groups, -1, x.shape[-1]).astype(jnp.float32)
    inv = lax.rsqrt(statistics.sq_dev_sum / statistics.divisor[:, None] + epsilon)
    y = (groups - statistics.mean[:, None]) * (scale * inv)[:, None] + bias
    return y.reshape(x.shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def normalize(x, statistics, scale, bias, epsilon, dtype):
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` of x [B, ..., C] with the biased
    variance of `statistics` (per group of items), computed in float32, returned in `dtype`.

    Hand-written gradient: two reductions of the incoming gradient (its sum, and its sum
    times the centred input, per group and channel) and one elementwise pass for the input.
    The cotangents of the statistics and of ``scale`` and ``bias`` are this device's share
    (`batch_moments` sums the former over the devices, the caller the latter).
    """
    return normalize_autodiff(x, statistics, scale, bias, epsilon, dtype)


def _normalize_fwd(x, statistics, scale, bias, epsilon, dtype):
    y = normalize_autodiff(x, statistics, scale, bias, epsilon, dtype)
    return y, (x, statistics, scale)


def _normalize_bwd(epsilon, dtype, residuals, dy):
    del dtype
    x, statistics, scale = residuals
    num_groups = statistics.mean.shape[0]
    dy = dy.reshape(num_groups, -1, x.shape[-1]).astype(jnp.float32)
    centred = x.reshape(dy.shape).astype(jnp.float32) - statistics.mean[:, None]
    inv = lax.rsqrt(statistics.sq_dev_sum / statistics.divisor[:, None] + epsilon)  # [G, C]
    d_bias, d_centred = sum_pair(dy, dy * centred, (1,))  # [G, C] each
    dx = (dy * (scale * inv)[:, None]).reshape(x.shape).astype(x.dtype)
    d_statistics = Statistics(
        mean=-(scale * inv) * d_bias,
        # d inv / d sq_dev_sum = -inv^3 / (2 divisor)
        sq_dev_sum=-0.5 * scale * d_centred * inv ** 3 / statistics.divisor[:, None],
        divisor=jnp.zeros_like(statistics.divisor), count=jnp.zeros_like(statistics.count))
    return dx, d_statistics, jnp.sum(d_centred * inv, axis=0), jnp.sum(d_bias, axis=0)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


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
      group_size: 0 (statistics over the whole batch) or the items per statistics group,
        which must divide the batch; not with ``axis_name``.

    Variables: params ``scale`` [C] (init 1) and ``bias`` [C] (init 0); batch_stats ``mean``
    [C] (init 0) and ``var`` [C] (init 1), all float32. Running statistics are not updated
    during ``init``.
    """

    use_running_average: bool | None = None
    axis_name: str | None = None
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    group_size: int = 0

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None,
                 mask: jnp.ndarray | None = None,
                 statistics: Statistics | None = None) -> jnp.ndarray:
        """Normalises ``x`` [B, ..., C]; returns an array of the same shape in ``self.dtype``.
        Training mode: ``mask`` [B] bool: only the True items enter the statistics;
        ``statistics``: those of ``x`` when already known (`batch_statistics` with this
        layer's mask, axis and groups), else computed here."""
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

        if use_running_average:
            mean, var = running_mean.value, running_var.value
            mul = scale * lax.rsqrt(var + self.epsilon)
            return ((x.astype(jnp.float32) - mean) * mul + bias).astype(self.dtype)

        if statistics is None:
            statistics = batch_statistics(x, mask, self.axis_name, self.group_size)
        y = normalize(x, statistics, scale, bias, self.epsilon, self.dtype)
        if not self.is_initializing():
            # from the first group (the reference's replica on its first GPU); statistics of
            # no item (an all-padding batch) update nothing
            count = statistics.count[0]
            m = jnp.where(count > 0, self.momentum, 0.0)
            mean = lax.stop_gradient(statistics.mean[0])
            var = lax.stop_gradient(statistics.sq_dev_sum[0]) / jnp.maximum(count - 1, 1)
            running_mean.value = (1.0 - m) * running_mean.value + m * mean
            running_var.value = (1.0 - m) * running_var.value + m * var
        return y


@dataclasses.dataclass(frozen=True)
class BatchNormSettings:
    """What every BatchNorm of a network shares: ``axis_name`` (synchronised statistics),
    ``group_size`` (statistics per group of items) and the torch ``momentum``."""

    axis_name: str | None = None
    group_size: int = 0
    momentum: float = 0.1

    def layer(self, train: bool, dtype: Any, name: str) -> BatchNorm:
        """The BatchNorm module (inside a compact method) in train or eval mode."""
        return BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                         momentum=self.momentum, dtype=dtype, group_size=self.group_size,
                         name=name)

    def statistics(self, x: jnp.ndarray, mask: jnp.ndarray | None) -> Statistics:
        """`batch_statistics` of x [B, ..., C] as this network's BatchNorm layers compute them."""
        return batch_statistics(x, mask, self.axis_name, self.group_size)
