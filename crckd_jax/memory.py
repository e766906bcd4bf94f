"""The class memory of CCD/CRP as a pytree: a `queue` and a `bank` behind one interface.

Both kinds hold two tables of rows, one of student and one of teacher embeddings, whose
rows are grouped by class. The interface every kind provides:

* `rows()` -> (student [M, d], teacher [M, d]): the rows the contrast indices point into;
* `sample_contrast(keys, labels, index, P, K)` -> [B, P + K] row ids, positives first;
* `update(e_s, e_t, labels, index, momentum)` -> the memory after writing a batch;
* `centroids()` -> (student [C, d], teacher [C, d]): per class mean of ReLU(rows);
* `z_student`, `z_teacher`: the NCE normalisation constants (< 0 means "not set yet");
* `num_items`: the number of rows holding an item (the NCE's data set size).

`bank` is the reference memory: one row per training item, momentum update with row
renormalisation. Its tables may have more rows than the fold has items (`rows=`): the
padding is never drawn, written or averaged, and the draws of the real rows do not depend
on it (threefry's draws of a longer vector begin with those of the shorter one), so every
fold of a data set can run one program with the shapes of its largest fold. `queue` keeps
a FIFO of the last Q embeddings per class, so its size does not depend on the data set.
Sampling, gather and update are vectorised; per-example random keys (derived from the data
set index, see `step.py`) make the draws independent of how a global batch is split across
devices.

Sampling rule (the reference's, for a batch item of class c with n_c rows, N items in all):
P positives drawn from the n_c rows of class c without replacement, and with replacement
when n_c < P; K negatives drawn from the N - n_c rows of the other classes without
replacement, and with replacement when K > N - n_c (at the paper's K = 4096 and N = 2929
negatives always repeat). The bank then overwrites column 0 with the item's own row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from crckd_jax.losses import l2_normalize


def uniform_rows(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The reference's initial memory: uniform in [-1/sqrt(d/3), 1/sqrt(d/3)], d = shape[-1]."""
    bound = 1.0 / math.sqrt(shape[-1] / 3.0)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _sample_positions(key, count, max_count, num):
    """`num` positions in [0, count): distinct when count >= num, else with replacement.

    `count` is traced, `max_count` (an upper bound of count) and `num` are static.
    """
    k_perm, k_repl = jax.random.split(key)
    with_replacement = jax.random.randint(k_repl, (num,), 0, count)
    if num > max_count:
        return with_replacement
    noise = jax.random.uniform(k_perm, (max_count,))
    noise = jnp.where(jnp.arange(max_count) < count, noise, 2.0)
    _, distinct = jax.lax.top_k(-noise, num)
    return jnp.where(count >= num, distinct, with_replacement)


def _sample_contrast_rows(key, start, count, num_items, num_rows, max_count, sorted_rows,
                          P, K):
    """One item's [P + K] row ids; its class occupies positions [start, start + count) of
    the first `num_items` (traced) of `sorted_rows` [num_rows]."""
    k_pos, k_neg = jax.random.split(key)
    positives = start + _sample_positions(k_pos, count, max_count, P)
    # Negatives: positions among the N - count items of other classes, then skip the class.
    others = _sample_positions(k_neg, num_items - count, num_rows, K)
    negatives = jnp.where(others >= start, others + count, others)
    return sorted_rows[jnp.concatenate([positives, negatives])]


class QueueMemory(struct.PyTreeNode):
    """Per-class FIFO queues of the last Q student and teacher embeddings.

    student, teacher: [C, Q, d]; head: [C] int32, next slot to write per class. Row id of
    slot q of class c is c * Q + q. Entries start as the reference's random rows.
    """

    student: jax.Array
    teacher: jax.Array
    head: jax.Array
    z_student: jax.Array
    z_teacher: jax.Array

    @classmethod
    def create(cls, key: jax.Array, num_classes: int, capacity: int, dim: int) -> "QueueMemory":
        k_s, k_t = jax.random.split(key)
        shape = (num_classes, capacity, dim)
        return cls(
            student=uniform_rows(k_s, shape),
            teacher=uniform_rows(k_t, shape),
            head=jnp.zeros((num_classes,), jnp.int32),
            z_student=jnp.float32(-1.0),
            z_teacher=jnp.float32(-1.0),
        )

    @property
    def num_rows(self) -> int:
        return self.student.shape[0] * self.student.shape[1]

    @property
    def num_items(self) -> int:
        return self.num_rows

    def rows(self) -> tuple[jax.Array, jax.Array]:
        dim = self.student.shape[-1]
        return self.student.reshape(-1, dim), self.teacher.reshape(-1, dim)

    def sample_contrast(self, keys, labels, index, num_positives, num_negatives):
        """keys [B] PRNG keys, labels [B] -> [B, P + K] row ids into `rows()`."""
        del index  # a queue holds no per-item row
        capacity = self.student.shape[1]
        sample = lambda k, c: _sample_contrast_rows(
            k, c * capacity, capacity, self.num_rows, self.num_rows, capacity,
            jnp.arange(self.num_rows), num_positives, num_negatives)
        return jax.vmap(sample)(keys, labels)

    def update(self, e_s, e_t, labels, index, momentum, valid=None):
        """Enqueue a batch (e [B, d], labels [B]) in order; only a class's last Q items stay.
        valid [B] bool: only those items are enqueued (all when None)."""
        del index, momentum
        num_classes, capacity, _ = self.student.shape
        one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)
        if valid is not None:
            one_hot = jnp.where(valid[:, None], one_hot, 0)
        rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), labels[:, None], 1)[:, 0] - 1
        per_class = jnp.sum(one_hot, axis=0)
        keep = rank >= per_class[labels] - capacity
        if valid is not None:
            keep = keep & valid
        slot = jnp.where(keep, (self.head[labels] + rank) % capacity, capacity)
        write = lambda table, e: table.at[labels, slot].set(e, mode="drop")
        return self.replace(
            student=write(self.student, e_s),
            teacher=write(self.teacher, e_t),
            head=(self.head + per_class) % capacity,
        )

    def centroids(self) -> tuple[jax.Array, jax.Array]:
        return (jnp.mean(jax.nn.relu(self.student), axis=1),
                jnp.mean(jax.nn.relu(self.teacher), axis=1))


class BankMemory(struct.PyTreeNode):
    """The reference memory bank: one student and one teacher row per training item.

    student, teacher: [M, d] (the reference's memory_v1, memory_v2), row i the training
    item of index i for i < N = num_items (int32 scalar), M - N rows of padding after
    them; labels [M] int32 (C on padding); sorted_rows [M]: row ids ordered by class,
    padding last; class_start, class_count [C] int32 locate each class in sorted_rows.
    max_class_count is static (it sizes the sampling noise; at least every class's count).
    """

    student: jax.Array
    teacher: jax.Array
    z_student: jax.Array
    z_teacher: jax.Array
    num_items: jax.Array
    labels: jax.Array
    sorted_rows: jax.Array
    class_start: jax.Array
    class_count: jax.Array
    max_class_count: int = struct.field(pytree_node=False)

    @classmethod
    def create(cls, key: jax.Array, train_labels, num_classes: int, dim: int,
               rows: int = 0, max_class_count: int = 0) -> "BankMemory":
        """train_labels [N]: the class of every training item (data set index -> class).
        rows, max_class_count: the table's rows and the sampling bound of a class, at least
        N and the largest class count (0: exactly those), e.g. the largest over the folds
        of a data set so that all its folds share one compiled step."""
        import numpy as np  # host-side tables, built once

        labels = np.asarray(train_labels, np.int64)
        counts = np.bincount(labels, minlength=num_classes)
        if rows and rows < labels.shape[0] or max_class_count and max_class_count < counts.max():
            raise ValueError(f"bank memory of {rows} rows and at most {max_class_count} per "
                             f"class cannot hold {labels.shape[0]} items, {counts.max()} in "
                             "the largest class")
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
            raise ValueError(f"train_labels must lie in [0, {num_classes}), got "
                             f"[{labels.min()}, {labels.max()}]")
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise ValueError(f"bank memory: classes {empty.tolist()} have no training item")
        k_s, k_t = jax.random.split(key)
        shape = (max(rows, labels.shape[0]), dim)
        padded = np.full(shape[0], num_classes, np.int64)
        padded[:labels.shape[0]] = labels
        return cls(
            student=uniform_rows(k_s, shape),
            teacher=uniform_rows(k_t, shape),
            z_student=jnp.float32(-1.0),
            z_teacher=jnp.float32(-1.0),
            num_items=jnp.int32(labels.shape[0]),
            labels=jnp.asarray(padded, jnp.int32),
            sorted_rows=jnp.asarray(np.argsort(padded, kind="stable"), jnp.int32),
            class_start=jnp.asarray(np.cumsum(counts) - counts, jnp.int32),
            class_count=jnp.asarray(counts, jnp.int32),
            max_class_count=max(max_class_count, int(counts.max())),
        )

    @property
    def num_rows(self) -> int:
        return self.student.shape[0]

    def rows(self) -> tuple[jax.Array, jax.Array]:
        return self.student, self.teacher

    def sample_contrast(self, keys, labels, index, num_positives, num_negatives):
        """keys [B] PRNG keys, labels, index [B] -> [B, P + K]; column 0 = the item's row."""
        sample = lambda k, c: _sample_contrast_rows(
            k, self.class_start[c], self.class_count[c], self.num_items, self.num_rows,
            self.max_class_count, self.sorted_rows, num_positives, num_negatives)
        idx = jax.vmap(sample)(keys, labels)
        return with_anchor_column(idx, index)

    def update(self, e_s, e_t, labels, index, momentum, valid=None):
        """Rows `index` [B] (distinct) <- norm(m * row + (1 - m) * e), e [B, d]; valid [B]
        bool: only those items' rows are written (all when None)."""
        del labels
        if valid is not None:  # the others to an out-of-range row, which the write drops
            index = jnp.where(valid, index, self.num_rows)
        mix = lambda table, e: table.at[index].set(
            l2_normalize(momentum * table[index] + (1.0 - momentum) * e), mode="drop")
        return self.replace(student=mix(self.student, e_s), teacher=mix(self.teacher, e_t))

    def centroids(self) -> tuple[jax.Array, jax.Array]:
        num_classes = self.class_count.shape[0]
        mean = lambda table: jax.ops.segment_sum(
            jax.nn.relu(table), self.labels, num_classes) / self.class_count[:, None]
        return mean(self.student), mean(self.teacher)


def with_anchor_column(contrast_idx: jax.Array, index: jax.Array) -> jax.Array:
    """The reference overwrites column 0 of the contrast indices with the item's own row."""
    return contrast_idx.at[:, 0].set(index.astype(contrast_idx.dtype))


Memory = QueueMemory | BankMemory
