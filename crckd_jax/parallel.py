"""Data parallelism over a 1-D device mesh: one per-device step, two compilers.

The step functions of `step.py` are written per device with collectives over the axis
`AXIS`. `DataParallel` compiles such a function either with `jax.jit` + `jax.shard_map`
over a `Mesh` of all devices of all processes (the default), or with `jax.pmap` over
this process's devices, and moves the state and batches in and out in the matching
layout. The state is replicated; the global batch is split across devices, each process
providing the rows of its own devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
BACKENDS = ("shard_map", "pmap")


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named `AXIS` over `devices` (default: all devices of all processes)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


class DataParallel:
    """Compiles a per-device step `(state, batch) -> (state, outputs)` for all devices.

    `outputs` must be replicated (reduced with collectives inside the step) when
    `sharded_outputs` is False, or per-example arrays [B_device, ...] when True (eval).
    """

    def __init__(self, backend: str = "shard_map", devices=None):
        if backend not in BACKENDS:
            raise ValueError(f"parallel.backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.mesh = data_mesh(devices)
        self.local_devices = [d for d in self.mesh.devices.flat
                              if d.process_index == jax.process_index()]

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def compile(self, step_fn: Callable, *, donate_state: bool = True,
                sharded_outputs: bool = False) -> Callable:
        donate = (0,) if donate_state else ()
        if self.backend == "pmap":
            return jax.pmap(step_fn, axis_name=AXIS, devices=self.local_devices,
                            donate_argnums=donate)
        # check_vma=False: gradients are summed explicitly with psum inside the step
        # (with the check on, grad of replicated parameters would add an implicit sum).
        mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                               out_specs=P(AXIS) if sharded_outputs else P(),
                               check_vma=False)
        return jax.jit(mapped, donate_argnums=donate)

    def put_state(self, state: Any) -> Any:
        """Replicate a host or single-device state on every device."""
        if self.backend == "pmap":
            n = len(self.local_devices)
            stacked = jax.tree.map(lambda x: jax.numpy.stack([x] * n), state)
            local = Mesh(np.asarray(self.local_devices), (AXIS,))
            return jax.device_put(stacked, NamedSharding(local, P(AXIS)))
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def get_state(self, state: Any) -> Any:
        """One copy of a replicated state."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: x[0], state)
        return state

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """This process's rows of the global batch -> arrays split over the devices."""
        if self.backend == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]),
                                local_batch)
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)

    def get_outputs(self, outputs: Any) -> Any:
        """Replicated outputs -> one copy on the host."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: np.asarray(x[0]), outputs)
        return jax.tree.map(np.asarray, outputs)

    def gather_examples(self, outputs: Any) -> Any:
        """Per-example outputs split over devices (and processes) -> whole numpy arrays."""
        from jax.experimental import multihost_utils

        if self.backend == "pmap":
            outputs = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)
        if jax.process_count() == 1:
            return jax.tree.map(np.asarray, outputs)
        return multihost_utils.process_allgather(outputs, tiled=True)
