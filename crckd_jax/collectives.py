"""Collectives over an optional named axis, for code written once per device.

With `axis_name=None` (one device, or a reference computation) or an axis of one device
(e.g. the data axis of a fold group of one device) each is the identity on this device's
value, and no collective is compiled; otherwise the `jax.lax` collective over that axis
(under `shard_map` or `pmap`, `crckd_jax.parallel`).
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp


def _spans_devices(axis_name: str | None) -> bool:
    """Whether `axis_name` names an axis of more than one device."""
    return axis_name is not None and jax.lax.axis_size(axis_name) > 1


def psum(x, axis_name: str | None):
    """The sum of `x` (a pytree) over the devices of `axis_name`."""
    return jax.lax.psum(x, axis_name) if _spans_devices(axis_name) else x


def psum_flat(tree, axis_name: str | None):
    """`psum` of a pytree of float32 arrays (the gradients) as one all-reduce of one flat
    buffer, cut back into the tree's arrays where they are used. Same sums, element by
    element. Compiled for 8 GPUs, XLA's combined all-reduce of the separate arrays was
    followed by one slice kernel per array (docs/parallel.md); the slices of one flat
    buffer fuse into their consumers (the optimizer update)."""
    if not _spans_devices(axis_name):
        return tree
    flat, unravel = jax.flatten_util.ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, axis_name))


def pmean(x, axis_name: str | None):
    """The mean of `x` (a pytree) over the devices of `axis_name`."""
    return jax.lax.pmean(x, axis_name) if _spans_devices(axis_name) else x


def all_gather(x: jax.Array, axis_name: str | None) -> jax.Array:
    """[B, ...] per device -> [devices * B, ...], the devices' blocks in axis order."""
    return jax.lax.all_gather(x, axis_name, tiled=True) if _spans_devices(axis_name) else x


def of_first_device(tree, axis_name: str):
    """Every leaf as it is on device 0 of `axis_name`, on all devices."""
    if not _spans_devices(axis_name):
        return tree
    first = jax.lax.axis_index(axis_name) == 0
    return jax.tree.map(lambda x: jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)),
                                               axis_name), tree)
