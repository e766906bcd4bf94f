"""Sampling, update, centroids and Z of both class memory kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crckd_jax.distillation import normalise_scores
from crckd_jax.losses import l2_normalize
from crckd_jax.memory import BankMemory, QueueMemory

KEY = jax.random.key(0)


def keys(n, seed=1):
    return jax.random.split(jax.random.key(seed), n)


def unit_rows(n, d, seed=0):
    return np.asarray(l2_normalize(jax.random.normal(jax.random.key(seed), (n, d))))


# Class 0: 12 items, class 1: exactly P = 4 items, class 2: 2 items (< P).
BANK_LABELS = np.array([0] * 12 + [1] * 4 + [2] * 2)
np.random.default_rng(0).shuffle(BANK_LABELS)
P = 4


def bank_sample(num_negatives, labels=BANK_LABELS, batch=None):
    memory = BankMemory.create(KEY, labels, 3, 8)
    index = np.arange(len(labels)) if batch is None else batch
    idx = memory.sample_contrast(keys(len(index)), jnp.asarray(labels[index]),
                                 jnp.asarray(index), P, num_negatives)
    return np.asarray(idx), index


def test_bank_positives_own_class_and_anchor_first():
    idx, index = bank_sample(num_negatives=6)
    assert idx.shape == (len(index), P + 6)
    np.testing.assert_array_equal(idx[:, 0], index)
    for row, i in zip(idx, index):
        cls = BANK_LABELS[i]
        assert np.all(BANK_LABELS[row[:P]] == cls)
        drawn = row[1:P]
        if np.sum(BANK_LABELS == cls) >= P:
            # Drawn without replacement; only the anchor overwrite may repeat a row.
            assert len(set(drawn.tolist())) == P - 1
        assert np.all(BANK_LABELS[row[P:]] != cls)


def test_bank_negatives_without_replacement_when_enough():
    idx, index = bank_sample(num_negatives=6)
    for row, i in zip(idx, index):
        others = np.sum(BANK_LABELS != BANK_LABELS[i])
        assert others >= 6
        assert len(set(row[P:].tolist())) == 6


def test_bank_negatives_with_replacement_when_too_few():
    # Class 0 has only 6 other-class items: K = 10 must repeat, and still avoid class 0.
    idx, index = bank_sample(num_negatives=10)
    for row, i in zip(idx, index):
        assert np.all(BANK_LABELS[row[P:]] != BANK_LABELS[i])
    class0 = idx[BANK_LABELS[index] == 0]
    assert all(len(set(r[P:].tolist())) <= 6 for r in class0)


def test_bank_sampling_covers_the_class():
    # Over many draws every row of a small class shows up as a positive.
    labels = BANK_LABELS
    memory = BankMemory.create(KEY, labels, 3, 8)
    item = int(np.flatnonzero(labels == 1)[0])
    idx = memory.sample_contrast(keys(200, 3), jnp.full((200,), 1), jnp.full((200,), item),
                                 P, 3)
    assert set(np.asarray(idx[:, 1:P]).ravel()) == set(np.flatnonzero(labels == 1))


def test_bank_rejects_empty_class():
    with pytest.raises(ValueError, match=r"classes \[1\] have no training item"):
        BankMemory.create(KEY, np.array([0, 0, 2]), 3, 8)


def test_bank_update_momentum_and_renormalisation():
    memory = BankMemory.create(KEY, BANK_LABELS, 3, 8)
    index = np.array([3, 7, 11])
    e_s, e_t = unit_rows(3, 8, 1), unit_rows(3, 8, 2)
    new = memory.update(jnp.asarray(e_s), jnp.asarray(e_t), None, jnp.asarray(index), 0.5)
    old = np.asarray(memory.student)
    want = 0.5 * old[index] + 0.5 * e_s
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(new.student)[index], want, rtol=1e-6)
    rest = np.setdiff1d(np.arange(len(BANK_LABELS)), index)
    np.testing.assert_array_equal(np.asarray(new.student)[rest], old[rest])


def test_bank_centroids_are_class_means_of_relu():
    memory = BankMemory.create(KEY, BANK_LABELS, 3, 8)
    cent_s, cent_t = memory.centroids()
    for c in range(3):
        rows = np.maximum(np.asarray(memory.teacher)[BANK_LABELS == c], 0)
        np.testing.assert_allclose(np.asarray(cent_t)[c], rows.mean(0), rtol=1e-6)


def test_bank_size_is_n_by_d_twice():
    memory = BankMemory.create(KEY, BANK_LABELS, 3, 8)
    assert memory.student.shape == memory.teacher.shape == (len(BANK_LABELS), 8)


@pytest.mark.parametrize("num_negatives", [6, 40])  # without and with replacement
def test_a_padded_bank_draws_writes_and_averages_as_the_unpadded_one(num_negatives):
    """Rows beyond the fold's items (another fold's larger training part) are never drawn,
    written or averaged, and the real rows' draws and values are those of a bank without
    them: one program serves every fold, and each fold trains as it would alone."""
    plain = BankMemory.create(KEY, BANK_LABELS, 3, 8)
    padded = BankMemory.create(KEY, BANK_LABELS, 3, 8, rows=30, max_class_count=20)
    n = len(BANK_LABELS)
    assert padded.student.shape == (30, 8) and int(padded.num_items) == n
    np.testing.assert_array_equal(np.asarray(padded.student)[:n], np.asarray(plain.student))
    index = np.array([3, 7, 11, 0])
    args = (keys(4), jnp.asarray(BANK_LABELS[index]), jnp.asarray(index), P, num_negatives)
    drawn = np.asarray(padded.sample_contrast(*args))
    np.testing.assert_array_equal(drawn, np.asarray(plain.sample_contrast(*args)))
    assert drawn.max() < n
    e_s, e_t = jnp.asarray(unit_rows(4, 8, 1)), jnp.asarray(unit_rows(4, 8, 2))
    update = lambda m: m.update(e_s, e_t, None, jnp.asarray(index), 0.5)  # noqa: E731
    written, expected = update(padded), update(plain)
    np.testing.assert_array_equal(np.asarray(written.student)[:n], np.asarray(expected.student))
    np.testing.assert_array_equal(np.asarray(written.student)[n:], np.asarray(padded.student)[n:])
    for got, want in zip(written.centroids(), expected.centroids()):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    u = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (4, 6)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(normalise_scores(u, jnp.float32(-1), padded.num_items, 0.0)[1]),
        np.asarray(normalise_scores(u, jnp.float32(-1), plain.num_items, 0.0)[1]))


def test_a_bank_smaller_than_its_items_is_refused():
    with pytest.raises(ValueError, match="cannot hold 18 items"):
        BankMemory.create(KEY, BANK_LABELS, 3, 8, rows=10)


def test_queue_sampling_rows_by_class():
    memory = QueueMemory.create(KEY, 3, capacity=5, dim=8)
    labels = jnp.array([0, 1, 2, 2])
    idx = np.asarray(memory.sample_contrast(keys(4), labels, None, 3, 7))
    row_class = np.arange(15) // 5
    for row, c in zip(idx, np.asarray(labels)):
        assert np.all(row_class[row[:3]] == c) and len(set(row[:3].tolist())) == 3
        assert np.all(row_class[row[3:]] != c) and len(set(row[3:].tolist())) == 7


def test_queue_sampling_with_replacement_when_capacity_is_small():
    memory = QueueMemory.create(KEY, 2, capacity=2, dim=8)
    idx = np.asarray(memory.sample_contrast(keys(3), jnp.array([0, 1, 1]), None, 3, 5))
    row_class = np.arange(4) // 2
    for row, c in zip(idx, [0, 1, 1]):
        assert np.all(row_class[row[:3]] == c) and np.all(row_class[row[3:]] != c)


def test_queue_fifo_wraps_and_keeps_last_items():
    memory = QueueMemory.create(KEY, 2, capacity=3, dim=4)
    e = unit_rows(5, 4, 5)
    labels = jnp.array([0, 0, 1, 0, 0])  # four class-0 items: only the last three stay
    new = memory.update(jnp.asarray(e), jnp.asarray(-e), labels, None, None)
    q = np.asarray(new.student)
    # Class 0 items in order: e0 (slot 0, overwritten), e1 (1), e3 (2), e4 (0 after wrap).
    np.testing.assert_array_equal(q[0], e[[4, 1, 3]])
    np.testing.assert_array_equal(q[1, 0], e[2])
    np.testing.assert_array_equal(q[1, 1:], np.asarray(memory.student)[1, 1:])
    np.testing.assert_array_equal(np.asarray(new.teacher)[0], -e[[4, 1, 3]])
    np.testing.assert_array_equal(new.head, [1, 1])
    # The next batch continues where the queue stopped.
    newer = new.update(jnp.asarray(e[:1]), jnp.asarray(e[:1]), jnp.array([0]), None, None)
    np.testing.assert_array_equal(np.asarray(newer.student)[0, 1], e[0])


def test_queue_centroids_and_size_independent_of_data():
    memory = QueueMemory.create(KEY, 4, capacity=6, dim=8)
    assert memory.student.shape == (4, 6, 8) and memory.num_rows == 24
    cent_s, _ = memory.centroids()
    np.testing.assert_allclose(cent_s, np.maximum(np.asarray(memory.student), 0).mean(1),
                               rtol=1e-6)


def test_z_set_once_then_frozen_or_tracked():
    u1, u2 = jnp.full((2, 3), 2.0), jnp.full((2, 3), 4.0)
    out, z = normalise_scores(u1, jnp.float32(-1), 10, 0.0)
    assert float(z) == 20.0 and np.allclose(out, 0.1)
    _, z_frozen = normalise_scores(u2, z, 10, 0.0)
    assert float(z_frozen) == 20.0
    _, z_tracked = normalise_scores(u2, z, 10, 0.9)
    assert float(z_tracked) == pytest.approx(0.9 * 20 + 0.1 * 40)
