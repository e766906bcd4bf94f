"""Data parallelism over a device mesh: one per-device step, two compilers.

The step functions of `step.py` are written per device with collectives over the axis
`AXIS`. `DataParallel` compiles such a function either with `jax.jit` + `jax.shard_map`
over a `Mesh` of all devices of all processes (the default), or with `jax.pmap` over the
same devices (each process feeding its own), and moves the state and batches in and out in
the matching layout. The state is replicated; the global batch is split across devices.

Folds side by side (`compile_side_by_side`) vmap the step over folds stacked on a leading
axis. With `fold_groups` G > 1 (shard_map, one process) the mesh is 2-D, `FOLD_AXIS` x
`AXIS`: G groups of devices, each training K / G of the K folds, data-parallel over its own
devices (the step's collectives span `AXIS` only, so within a group); a one-fold program
runs the same on every group.

Layout of a global batch of B rows over P processes with D devices each (mesh order is
process-major): process p provides rows [p * B/P, (p + 1) * B/P) (see `data.pipeline`), and
its devices take consecutive blocks of B/(P*D) rows of those. Both backends use this order,
so the all-gathers inside the step (the class memory's update) see the global batch in the
same order for any number of processes or devices, and `gather_examples` returns per-example
outputs in global batch order.

State layouts: with `shard_map` the state is one global array per leaf, replicated over the
mesh; with `pmap` it is stacked per local device ([local devices, ...]). `get_state` returns
the first form for both (what checkpoints hold), `put_state` accepts it (or host arrays) and
returns the backend's form.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from crckd_jax.settings import PARALLEL_BACKENDS

AXIS = "data"
FOLD_AXIS = "fold"


def data_mesh(devices=None, fold_groups: int = 1) -> Mesh:
    """A 1-D mesh named `AXIS` over `devices` (default: all devices of all processes), or
    with `fold_groups` G > 1 a 2-D mesh (`FOLD_AXIS`: G, `AXIS`: devices / G).

    Devices are ordered by process (stable within a process), so each process's devices
    hold one contiguous block of the global batch.
    """
    devices = list(devices if devices is not None else jax.devices())
    devices.sort(key=lambda d: d.process_index)
    if fold_groups == 1:
        return Mesh(np.asarray(devices), (AXIS,))
    return Mesh(np.asarray(devices).reshape(fold_groups, -1), (FOLD_AXIS, AXIS))


class DataParallel:
    """Compiles a per-device step `(state, batch) -> (state, outputs)` for all devices.

    `outputs` must be replicated (reduced with collectives inside the step) when
    `sharded_outputs` is False, or per-example arrays [B_device, ...] when True (eval).
    """

    def __init__(self, backend: str = "shard_map", devices=None, fold_groups: int = 1):
        if backend not in PARALLEL_BACKENDS:
            raise ValueError(
                f"parallel.backend must be one of {PARALLEL_BACKENDS}, got {backend!r}")
        if fold_groups > 1 and backend != "shard_map":
            raise ValueError("fold groups need the shard_map backend")
        self.backend = backend
        self.fold_groups = fold_groups
        self.mesh = data_mesh(devices, fold_groups)
        self.local_devices = [d for d in self.mesh.devices.flat
                              if d.process_index == jax.process_index()]
        counts = {}
        for d in self.mesh.devices.flat:
            counts[d.process_index] = counts.get(d.process_index, 0) + 1
        if len(set(counts.values())) != 1:
            raise ValueError(f"every process needs the same number of devices, got {counts}")
        self.num_processes = len(counts)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))  # rows split over devices
        self._local_mesh = Mesh(np.asarray(self.local_devices), (AXIS,))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def num_local_devices(self) -> int:
        return len(self.local_devices)

    def compile(self, step_fn: Callable, *, donate_state: bool = True,
                sharded_outputs: bool = False, replicated_args: int = 0) -> Callable:
        """`step_fn(state, batch, *replicated)` compiled for every device: the state and
        `replicated_args` further arguments in the state's layout (`put_state`), the batch
        split over the devices; outputs replicated, or split like the batch with
        `sharded_outputs`."""
        donate = (0,) if donate_state else ()
        if self.backend == "pmap":
            # All devices of all processes: the named axis (and its collectives) spans them;
            # each process passes [local devices, ...] arrays.
            return jax.pmap(step_fn, axis_name=AXIS, devices=list(self.mesh.devices.flat),
                            donate_argnums=donate)
        # check_vma=False: gradients are summed explicitly with psum inside the step
        # (with the check on, grad of replicated parameters would add an implicit sum).
        in_specs = (P(), P(AXIS), *[P()] * replicated_args)
        mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=in_specs,
                               out_specs=P(AXIS) if sharded_outputs else P(),
                               check_vma=False)
        return jax.jit(mapped, donate_argnums=donate)

    def compile_side_by_side(self, fold_step: Callable, donate_state: bool = True
                             ) -> Callable:
        """The per-device step of one fold, `fold_step(state, batch, class_weight) ->
        (state, outputs)`, compiled for K folds as one program: `(states, batches,
        class_weights) -> (states, outputs)`, states and class weights stacked on a leading
        fold axis [K, ...] (laid out as `fold_sharding` says), `batches` a tuple of K
        batches (`put_batch`), outputs [K, ...]. With fold groups and K a multiple of them
        the folds are split over the groups (outputs too); else every device takes part in
        every fold (outputs replicated). `donate_state`: as in `compile`."""

        everywhere = self.compile(_stacking_batches(jax.vmap(fold_step)), replicated_args=1,
                                  donate_state=donate_state)
        if self.fold_groups == 1:
            return everywhere
        # Each group takes its folds' slice of the stacked batches (put on every group),
        # states and class weights: no data crosses groups in the step.
        per_group = jax.shard_map(
            jax.vmap(fold_step), mesh=self.mesh,
            in_specs=(P(FOLD_AXIS), P(FOLD_AXIS, AXIS), P(FOLD_AXIS)),
            out_specs=P(FOLD_AXIS), check_vma=False)
        # The outputs stay split over the groups (the host reads them every few steps).
        in_groups = jax.jit(_stacking_batches(per_group, NamedSharding(self.mesh, P(None, AXIS))),
                            donate_argnums=(0,) if donate_state else ())
        return _ByFoldCount(self.folds_split, in_groups, everywhere)

    def folds_split(self, folds: int) -> bool:
        """Whether `folds` folds side by side are split over the fold groups."""
        return self.fold_groups > 1 and folds % self.fold_groups == 0

    def fold_sharding(self, folds: int) -> NamedSharding | None:
        """The layout of `folds` stacked fold states in `compile_side_by_side`'s program:
        split over the fold groups, or (None) the backend's replicated layout."""
        return NamedSharding(self.mesh, P(FOLD_AXIS)) if self.folds_split(folds) else None

    def compile_state_fn(self, fn: Callable, out_sharding: NamedSharding | None = None
                         ) -> Callable:
        """`fn(state) -> pytree of states` (no collectives) compiled for the state's layout:
        replicated arrays in and out (`shard_map`; `out_sharding` instead, e.g.
        `fold_sharding`), or once per device (`pmap`)."""
        if self.backend == "pmap":
            return jax.pmap(fn, axis_name=AXIS, devices=list(self.mesh.devices.flat))
        return jax.jit(fn, out_shardings=out_sharding or self.replicated)

    # --- state -----------------------------------------------------------------------

    def _replicate(self, x: Any) -> jax.Array:
        """A leaf -> one global array replicated over the mesh (the same value is expected
        on every process, as for a state built from the same seed or read from a
        checkpoint).

        The result carries exactly the sharding the compiled step returns: an equivalent
        but different one (a single-device array on a one-device mesh) would make the
        step's second call trace and compile again. It never shares a buffer with an array
        of another sharding, so donating it to the step leaves the caller's `x` intact: the
        value goes through the host, as `device_put` of a device array onto a mesh of
        several devices keeps that array's buffer as the shard on its own device (even with
        `may_alias=False`; measured with 4 CPU devices).
        """
        if isinstance(x, jax.Array) and x.sharding == self.replicated:
            return x
        return jax.device_put(np.asarray(x), self.replicated, may_alias=False)

    def _stack_local(self, x: Any) -> jax.Array:
        """A leaf -> [local devices, ...], one copy on each local device (pmap layout)."""
        shards = {}
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            shards = {s.device: s.data for s in x.addressable_shards}
        if all(d in shards for d in self.local_devices):
            pieces = [shards[d][None] for d in self.local_devices]
        else:
            host = np.asarray(x)[None]
            pieces = [jax.device_put(host, d) for d in self.local_devices]
        shape = (self.num_local_devices, *np.shape(x))
        return jax.make_array_from_single_device_arrays(
            shape, NamedSharding(self._local_mesh, P(AXIS)), pieces)

    def _split_local(self, x: np.ndarray) -> jax.Array:
        """Host rows [n * b, ...] -> [n local devices, b, ...], block i on device i (pmap)."""
        n = self.num_local_devices
        blocks = np.asarray(x).reshape(n, x.shape[0] // n, *x.shape[1:])
        pieces = [jax.device_put(blocks[i:i + 1], d) for i, d in enumerate(self.local_devices)]
        return jax.make_array_from_single_device_arrays(
            blocks.shape, NamedSharding(self._local_mesh, P(AXIS)), pieces)

    def put_state(self, state: Any) -> Any:
        """Replicate a state on every device, in the backend's layout.

        `state` may hold host arrays, single-device arrays or the replicated global
        arrays of `get_state` (e.g. restored from a checkpoint).
        """
        if self.backend == "pmap":
            return jax.tree.map(self._stack_local, state)
        return jax.tree.map(self._replicate, state)

    def get_state(self, state: Any) -> Any:
        """One copy of a replicated state: global arrays replicated over the mesh.

        This is the layout checkpoints are saved in and restored to (`abstract_state`),
        whatever the backend, so a checkpoint does not depend on the backend, the number
        of processes or the number of devices.
        """
        if self.backend != "pmap":
            return state

        def first_copy(x):
            copies = {s.device: s.data[0] for s in x.addressable_shards}
            return jax.make_array_from_single_device_arrays(
                x.shape[1:], self.replicated, [copies[d] for d in self.local_devices])

        return jax.tree.map(first_copy, state)

    def abstract_state(self, state: Any) -> Any:
        """Shapes, dtypes and the replicated sharding of `state`'s leaves (the target of a
        checkpoint restore); `state` is a host/single-device state such as the initial one."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self.replicated),
            state)

    # --- batches and outputs -----------------------------------------------------------

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """This process's rows of the global batch -> arrays split over the devices."""
        if self.backend == "pmap":
            return jax.tree.map(self._split_local, local_batch)
        # One call for the whole batch: per-leaf calls cost ~2x the host time.
        return jax.make_array_from_process_local_data(
            self.batch_sharding, local_batch)

    def prefetch(self, dataset: grain.IterDataset, size: int) -> grain.DatasetIterator:
        """An iterator over `dataset`'s batches put on the devices by a background thread,
        `size` batches ahead of their use, so the host work of a transfer (and the batch's
        read) overlaps the running steps instead of delaying the next dispatch.

        Its `get_state()` / `set_state()` are those of `dataset`'s iterator as of the last
        batch returned (not of the batches read ahead): what a checkpoint taken after that
        batch's step must hold. `close()` stops the thread.
        """
        device_batches = grain.experimental.ThreadPrefetchIterDataset(
            dataset.map(self.put_batch), prefetch_buffer_size=size)
        return iter(device_batches)

    def get_outputs(self, outputs: Any) -> Any:
        """Replicated outputs -> one copy on the host."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: np.asarray(x[0]), outputs)
        return jax.tree.map(np.asarray, outputs)

    def gather_examples(self, outputs: Any) -> Any:
        """Per-example outputs split over devices (and processes) -> whole numpy arrays,
        in global batch order, on every process."""
        from jax.experimental import multihost_utils

        if self.backend == "pmap":
            outputs = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]),
                                   outputs)
        if jax.process_count() == 1:
            return jax.tree.map(np.asarray, outputs)
        return multihost_utils.process_allgather(outputs, tiled=True)


def _stacking_batches(step: Callable, layout: NamedSharding | None = None) -> Callable:
    """`step(states, stacked batch, class_weights)` taking a tuple of K batches instead,
    stacked on a leading fold axis inside the program (laid out as `layout`: where the
    batches already are, so that no device sends its batch elsewhere)."""

    def train_side_by_side(states, batches, class_weights):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        if layout is not None:
            stacked = jax.lax.with_sharding_constraint(stacked, layout)
        return step(states, stacked, class_weights)

    return train_side_by_side


class _ByFoldCount:
    """Calls (or lowers) `split` when `is_split(K)` for K = the number of batches, else
    `everywhere`."""

    def __init__(self, is_split: Callable[[int], bool], split: Callable,
                 everywhere: Callable):
        self._pick = lambda batches: split if is_split(len(batches)) else everywhere

    def __call__(self, states, batches, class_weights):
        return self._pick(batches)(states, batches, class_weights)

    def lower(self, states, batches, class_weights):
        return self._pick(batches).lower(states, batches, class_weights)
