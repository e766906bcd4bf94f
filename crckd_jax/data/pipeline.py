"""grain input pipelines over a prepared data set, one slice of each global batch per process.

Training batches (dict of numpy arrays, B = global batch / process count):
  image                         uint8 [B, s, s, 3]  the stored image at the model size
                                (augment='device': the step makes the two views on device)
  image_student, image_teacher  float32 [B, s, s, 3]  instead of `image` with augment='host':
                                two independent views made by PIL, ImageNet-normalised
  label                         int32 [B]
  index                         int32 [B]  position in the fold's training list, 0..N_train-1
  mask                          bool [B]   only with keep_partial_batch: False on padding
                                (a zero image, label 0, index 0)
Evaluation batches: image uint8 [B, s, s, 3] (normalised on the devices), label int32 [B],
index int32 [B] (position in the evaluated list; -1 on padding), mask bool [B] (False on
padding).

Training order: the stream of training indices is a concatenation of passes; pass q is a
permutation of 0..N_train-1 (seeded by seed + q) cut to whole global batches, so every
batch is full and the N_train mod global_batch items cut from one pass are seen in the
others; or, with `keep_partial_batch` (the reference's loader), every item of the pass is
used and the last batch of the pass holds the remaining r items, split into the batch's
BatchNorm groups (`group_size` items each; the whole batch when 0) as torch's `chunk`
splits them over DataParallel replicas (ceil(r / groups) per group, the last ones smaller or
empty), each group padded to `group_size` with masked items. An epoch is `steps_per_epoch`
consecutive global batches of the stream (default: one pass). With augment='host', global
position p of the stream is augmented with an RNG seeded by (seed, p), so batches do not
depend on the number of processes or threads (with 'device', the step keys each item's views
by the run seed, the step and the item's index).

Processes: process i of n takes the contiguous positions [i * B/n, (i + 1) * B/n) of every
global batch of B: every example is read once per pass across all processes, and the
processes' slices laid one after the other (which is how
`jax.make_array_from_process_local_data` assembles the global batch) give the global batch
in the same order as one process reads it. The iterator's get_state()/set_state() resume
the exact stream; its state counts this process's items, so a checkpoint written with n
processes is resumed with m through `rescale_iterator_state`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import grain
import jax
import numpy as np

from crckd_jax.data import augment, splits
from crckd_jax.errors import DataError

if TYPE_CHECKING:  # defined where it is built; annotations only (prepare imports tfds)
    from crckd_jax.data.prepare import FoldData


class _ReadRecord(grain.transforms.Map):
    """List position i -> {'image' uint8, 'label', 'index'} read from the data source."""

    def __init__(self, source: Sequence[dict], records: np.ndarray, labels: np.ndarray):
        self.source, self.records, self.labels = source, records, labels

    def map(self, i: int) -> dict:
        example = self.source[int(self.records[i])]
        if example["label"] != self.labels[i]:
            raise DataError(
                f'record {self.records[i]} has label {example["label"]} in the data set '
                f"but {self.labels[i]} in the fold file; run --mode prepare again"
            )
        return {"image": example["image"], "label": np.int32(self.labels[i]), "index": np.int32(i)}


class _PassStream(grain.MapDataset):
    """Position p -> training index: pass q = p // per_pass, a numpy permutation of the
    items seeded by (seed, q), computed once per pass (grain's element-wise index shuffle
    cost ~0.1 ms of host CPU per item). Without `partial`, the first per_pass entries of the
    permutation (whole batches); with `partial` = (batch, group_size), per_pass covers every
    item and the pass's last batch is laid out by `partial_batch_rows` (-1: padding)."""

    def __init__(self, num_items: int, per_pass: int, length: int, seed: int,
                 partial: tuple[int, int] | None = None):
        super().__init__()
        self.num_items, self.per_pass, self.length, self.seed = num_items, per_pass, length, seed
        self.last_rows = None
        if partial is not None:
            batch, group = partial
            start = per_pass - batch
            self.last_start = start
            self.last_rows = partial_batch_rows(num_items - start, batch, group or batch)

    def __len__(self) -> int:
        return self.length

    @functools.lru_cache(maxsize=4)
    def _permutation(self, q: int) -> np.ndarray:
        return np.random.default_rng([self.seed, q]).permutation(self.num_items)

    def __getitem__(self, p):
        if isinstance(p, slice):
            return self.slice(p)
        q, j = divmod(p, self.per_pass)
        if self.last_rows is not None and j >= self.last_start:
            row = int(self.last_rows[j - self.last_start])
            return -1 if row < 0 else int(self._permutation(q)[self.last_start + row])
        return int(self._permutation(q)[j])

    def __str__(self) -> str:
        return f"PassStream(num_items={self.num_items}, per_pass={self.per_pass})"


def partial_batch_rows(remaining: int, batch: int, group: int) -> np.ndarray:
    """[batch] int: for each row of a pass's last batch, which of its `remaining` items it
    holds (0..remaining-1), or -1 (padding). The items are split into the batch / group
    groups as torch.chunk splits a tensor over DataParallel replicas."""
    num_groups = batch // group
    chunk = -(-remaining // num_groups)
    rows = np.full(batch, -1, np.int64)
    for g in range(num_groups):
        items = np.arange(g * chunk, min((g + 1) * chunk, remaining))
        rows[g * group: g * group + len(items)] = items
    return rows


class _ProcessRows(grain.MapDataset):
    """Local position j -> global position of this process's part of each global batch:
    batch j // b, row i * b + j % b, with b = B / n the local batch of process i of n."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, local_batch: int,
                 process_index: int):
        super().__init__(parent)
        if len(parent) % global_batch:
            raise ValueError(f"{len(parent)} items are not whole global batches of "
                             f"{global_batch}")
        self.global_batch, self.local_batch = global_batch, local_batch
        self.offset = process_index * local_batch
        self.length = len(parent) // global_batch * local_batch

    def __len__(self) -> int:
        return self.length

    def _global(self, j: int) -> int:
        step, row = divmod(j, self.local_batch)
        return step * self.global_batch + self.offset + row

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        return self._parent[self._global(j)]

    def _getitems(self, indices):
        return self._parent._getitems([self._global(j) for j in indices])

    def __str__(self) -> str:
        return (f"ProcessRows(global_batch={self.global_batch}, "
                f"local_batch={self.local_batch}, offset={self.offset})")


def _process_rows(ds: grain.MapDataset, global_batch: int, index: int, count: int):
    local = _local_batch(global_batch, count)
    return ds if count == 1 else _ProcessRows(ds, global_batch, local, index)


def rescale_iterator_state(state: dict, global_batch_size: int, saved_process_count: int,
                           process_count: int | None = None) -> dict:
    """A training iterator state saved with `saved_process_count` processes, for this
    run's process count (the same global position of the stream)."""
    count = jax.process_count() if process_count is None else process_count
    if count == saved_process_count:
        return state
    if set(state) != {"next_index"}:
        raise DataError(
            f"cannot resume the data iterator of a checkpoint written by "
            f"{saved_process_count} processes with {count} processes (iterator state "
            f"{sorted(state)}); resume with {saved_process_count} processes or with "
            "data.worker_count=0")
    saved_local = _local_batch(global_batch_size, saved_process_count)
    steps, rest = divmod(int(state["next_index"]), saved_local)
    if rest:
        raise DataError(f"iterator state {state} is not at a global batch boundary")
    return {"next_index": steps * _local_batch(global_batch_size, count)}


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    return global_batch_size // process_count


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        return jax.process_index(), jax.process_count()
    return process_index, process_count


def steps_per_pass(num_train: int, global_batch_size: int,
                   keep_partial_batch: bool = False) -> int:
    """Global batches in one pass over the training items: the full ones, and the partial
    last one with `keep_partial_batch` (DataError if there is no full batch)."""
    if num_train < global_batch_size:
        raise DataError(
            f"the training fold has {num_train} items, fewer than the global batch "
            f"size {global_batch_size}"
        )
    if keep_partial_batch:
        return -(-num_train // global_batch_size)
    return num_train // global_batch_size


def _aligned_batch(elements: Sequence[dict]) -> dict[str, np.ndarray]:
    """grain's batch function: the elements' arrays stacked into 64-byte-aligned arrays,
    which XLA's CPU client uses in place when a batch is put on its device (no copy)."""
    batch = {}
    for key in elements[0]:
        first = np.asarray(elements[0][key])
        shape, dtype = (len(elements), *first.shape), first.dtype
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(nbytes + 64, np.uint8)
        start = -raw.ctypes.data % 64
        out = raw[start:start + nbytes].view(dtype).reshape(shape)
        batch[key] = np.stack([e[key] for e in elements], out=out)
    return batch


def _to_iter(
    ds: grain.MapDataset,
    local_batch: int,
    read_threads: int,
    prefetch_batches: int,
    worker_count: int,
) -> grain.IterDataset:
    options = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_batches * local_batch
    )
    it = ds.to_iter_dataset(options).batch(local_batch, drop_remainder=True,
                                           batch_fn=_aligned_batch)
    if worker_count:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=prefetch_batches
            )
        )
    return it


def train_dataset(
    data: FoldData,
    *,
    global_batch_size: int,
    image_size: int,
    num_epochs: int,
    seed: int,
    steps_per_epoch: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 4,
    prefetch_batches: int = 4,
    worker_count: int = 0,
    augment_on: str = "device",
    keep_partial_batch: bool = False,
    group_size: int = 0,
) -> grain.IterDataset:
    """`num_epochs * steps` training batches of this process (see the module doc); `steps` =
    `steps_per_epoch` or, when 0, `steps_per_pass`. `augment_on` is 'device' (uint8 `image`)
    or 'host' (float32 views). `keep_partial_batch`: every pass ends with its partial batch,
    laid out in BatchNorm groups of `group_size` (0: one group), with a `mask`. `iter()` it;
    the iterator's state can be saved and restored."""
    index, count = _processes(process_index, process_count)
    local = _local_batch(global_batch_size, count)
    num_items = len(data.fold.train)
    full = steps_per_pass(num_items, global_batch_size, keep_partial_batch)
    steps = steps_per_epoch or full
    ds = _PassStream(
        num_items,
        full * global_batch_size,
        num_epochs * steps * global_batch_size,
        seed,
        partial=(global_batch_size, group_size) if keep_partial_batch else None,
    )
    read = _ReadRecord(data.source, data.fold.train, data.fold.train_labels)
    if keep_partial_batch:
        stored = data.source[int(data.fold.train[0])]["image"].shape
        ds = ds.map(_ReadPadded(read, stored, pad_index=0))
    else:
        ds = ds.map(read)
    if augment_on == "host":
        ds = ds.random_map(augment.TwoViews(image_size), seed=(seed + 1) % 2**32)
    elif augment_on == "device":
        ds = ds.map(augment.Resized(image_size))
    else:
        raise ValueError(f"augment_on must be 'device' or 'host', got {augment_on!r}")
    ds = _process_rows(ds, global_batch_size, index, count)
    return _to_iter(ds, local, read_threads, prefetch_batches, worker_count)


class _ReadPadded(grain.transforms.Map):
    """List position p -> `_ReadRecord`'s element with mask True, or, for p outside the list
    (past its end, or -1), padding: a zero image, label 0, index `pad_index`, mask False."""

    def __init__(self, read: _ReadRecord, store_shape: tuple[int, ...], pad_index: int):
        self.read, self.store_shape, self.pad_index = read, store_shape, pad_index

    def map(self, p: int) -> dict:
        if 0 <= p < len(self.read.records):
            return {**self.read.map(p), "mask": np.bool_(True)}
        return {
            "image": np.zeros(self.store_shape, np.uint8),
            "label": np.int32(0),
            "index": np.int32(self.pad_index),
            "mask": np.bool_(False),
        }


def eval_dataset(
    data: FoldData,
    *,
    split: str = "test",
    global_batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 4,
    prefetch_batches: int = 4,
    worker_count: int = 0,
) -> grain.IterDataset:
    """One pass over `split` ('test' | 'val' | 'train') in list order, padded to whole global
    batches; each item appears exactly once with mask True across all processes, and the
    processes' batches laid one after the other are the global batches, in list order."""
    if split not in splits.SPLITS:
        raise ValueError(f"split {split!r} is not one of {splits.SPLITS}")
    index, count = _processes(process_index, process_count)
    local = _local_batch(global_batch_size, count)
    records, labels = getattr(data.fold, split), getattr(data.fold, f"{split}_labels")
    num_batches = -(-len(records) // global_batch_size)
    store_shape = (image_size, image_size, 3)
    ds = grain.MapDataset.range(num_batches * global_batch_size)
    ds = ds.map(_ReadPadded(_ReadRecord(data.source, records, labels), store_shape, pad_index=-1))
    ds = ds.map(augment.Resized(image_size))
    ds = _process_rows(ds, global_batch_size, index, count)
    return _to_iter(ds, local, read_threads, prefetch_batches, worker_count)
