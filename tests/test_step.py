"""The compiled CRCKD train step on a small DenseNet at 64x64, for both memory kinds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_settings
from crckd_jax import losses, teacher
from crckd_jax.memory import BankMemory, QueueMemory
from crckd_jax.models.densenet import CRCKDNet, densenet_config
from crckd_jax.models.networks import Networks
from crckd_jax.optim import make_optimizer
from crckd_jax.state import create_train_state
from crckd_jax.step import StepConfig, eval_step, make_train_step

NUM_CLASSES, BATCH, SIZE, N_TRAIN, DIM = 3, 6, 64, 24, 16
TRAIN_LABELS = np.arange(N_TRAIN) % NUM_CLASSES


def make_memory(kind):
    if kind == "queue":
        return lambda key: QueueMemory.create(key, NUM_CLASSES, capacity=8, dim=DIM)
    return lambda key: BankMemory.create(key, TRAIN_LABELS, NUM_CLASSES, DIM)


def small_step_config(preset="paper", batch_size=BATCH):
    """The step's settings for the tiny model: P = 3, K = 10, d = DIM, 5 steps per epoch."""
    settings = run_settings(loss={"preset": preset}, train={"batch_size": batch_size},
                            memory={"num_positives": 3, "num_negatives": 10, "embed_dim": DIM})
    return StepConfig.from_settings(settings, steps_per_epoch=5, axis_name=None)


def build(kind, seed=0, preset="paper"):
    model = CRCKDNet(densenet_config("densenet_tiny"), NUM_CLASSES, hidden_dim=32)
    optimizer = make_optimizer(total_steps=10, max_lr=1e-3)
    config = small_step_config(preset=preset)
    networks = Networks(model, DIM)
    state = create_train_state(jax.random.key(seed), networks, optimizer, make_memory(kind),
                               (SIZE, SIZE, 3))
    class_weight = losses.class_weights(np.bincount(TRAIN_LABELS))
    step = jax.jit(functools.partial(make_train_step(networks, optimizer, config),
                                     class_weight=class_weight))
    return model, state, step


def batch(i):
    rng = np.random.default_rng(i)
    index = rng.choice(N_TRAIN, BATCH, replace=False).astype(np.int32)
    return {
        "image_student": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
        "image_teacher": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
        "label": TRAIN_LABELS[index].astype(np.int32),
        "index": index,
    }


def copy(tree):
    return jax.tree.map(np.asarray, tree)


@functools.cache
def two_steps(kind):
    """States before, after one and after two steps, and the metrics of both steps."""
    _, state, step = build(kind)
    s0 = copy(state)
    state, m1 = step(state, batch(1))
    s1 = copy(state)
    state, m2 = step(state, batch(2))
    return s0, s1, copy(state), copy(m1), copy(m2)


@pytest.mark.parametrize("kind", ["queue", "bank"])
def test_full_objective_is_finite_and_every_term_active(kind):
    _, _, _, m1, m2 = two_steps(kind)
    for m in (m1, m2):
        for term in ("loss", "ce", "mt", "ccd", "crp", "ccd_student", "ccd_teacher"):
            assert np.isfinite(m[term]), term
        for term in ("ce", "ccd", "crp"):
            assert m[term] > 0, term
        assert m["weight_ce"] == 1 and m["weight_ccd"] == np.float32(0.1)
        assert m["weight_crp"] == 1 and m["weight_mt"] > 0
    expected = sum(m1[f"weight_{k}"] * m1[k] for k in ("ce", "mt", "ccd", "crp"))
    np.testing.assert_allclose(m1["loss"], expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["queue", "bank"])
def test_ema_follows_formula(kind):
    s0, s1, s2, _, _ = two_steps(kind)
    # Step 0: alpha = 0, the teacher becomes the updated student.
    for t, s in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(s1.params["student"])):
        np.testing.assert_array_equal(t, s)
    alpha = float(teacher.ema_alpha(1, 0.99))
    assert alpha == 0.5
    for t2, t1, s in zip(jax.tree.leaves(s2.ema_params), jax.tree.leaves(s1.ema_params),
                         jax.tree.leaves(s2.params["student"])):
        np.testing.assert_allclose(t2, alpha * t1 + (1 - alpha) * s, rtol=1e-6, atol=1e-7)
    # The teacher's BatchNorm ran in train mode and kept its own running statistics.
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(s1.ema_batch_stats), jax.tree.leaves(s0.ema_batch_stats))]
    assert all(changed)
    assert int(s2.step) == 2


def test_bank_memory_and_z_change_as_specified():
    s0, s1, s2, _, _ = two_steps("bank")
    b1 = batch(1)
    assert float(s0.memory.z_student) == -1 and float(s0.memory.z_teacher) == -1
    assert float(s1.memory.z_student) > 0 and float(s1.memory.z_teacher) > 0
    # Frozen after the first step (reference).
    assert s2.memory.z_student == s1.memory.z_student
    assert s2.memory.z_teacher == s1.memory.z_teacher
    touched = np.zeros(N_TRAIN, bool)
    touched[b1["index"]] = True
    for table in ("student", "teacher"):
        before, after = getattr(s0.memory, table), getattr(s1.memory, table)
        np.testing.assert_array_equal(after[~touched], before[~touched])
        assert not np.any(np.all(after[touched] == before[touched], axis=1))
        np.testing.assert_allclose(np.linalg.norm(after[touched], axis=1), 1, rtol=1e-6)


def test_queue_memory_enqueues_the_batch():
    s0, s1, _, _, _ = two_steps("queue")
    labels = batch(1)["label"]
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    np.testing.assert_array_equal(s1.memory.head, (s0.memory.head + counts) % 8)
    for c in range(NUM_CLASSES):
        written = slice(0, counts[c])
        np.testing.assert_allclose(
            np.linalg.norm(s1.memory.student[c, written], axis=1), 1, rtol=1e-6)
        np.testing.assert_array_equal(s1.memory.student[c, counts[c]:],
                                      s0.memory.student[c, counts[c]:])
    assert s1.memory.student.shape == s0.memory.student.shape


@pytest.mark.parametrize("kind", ["queue", "bank"])
def test_same_seed_gives_bit_identical_states(kind):
    _, _, s2, _, _ = two_steps(kind)
    _, state, step = build(kind)
    for i in (1, 2):
        state, _ = step(state, batch(i))
    for a, b in zip(jax.tree.leaves(copy(state)), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(a, b)


def test_reference_preset_schedule_in_step():
    _, state, step = build("queue", preset="reference")
    _, metrics = step(state, batch(1))
    assert metrics["weight_mt"] == 0 and metrics["weight_crp"] == 0
    assert metrics["weight_ccd"] == np.float32(0.1)


def test_eval_step_probabilities():
    model, state, _ = build("queue")
    b = batch(3)
    out = jax.jit(functools.partial(eval_step, model=model))(state, {"image": b["image_student"]})
    np.testing.assert_allclose(np.sum(out["probs"], axis=1), 1, rtol=1e-6)
    assert out["features"].shape == (BATCH, 32)


@pytest.mark.slow
def test_densenet121_224_batch8_one_step():
    model = CRCKDNet(densenet_config("densenet121"), 7)
    optimizer = make_optimizer(total_steps=10)
    config = StepConfig.from_settings(
        run_settings(loss={"preset": "paper"}, train={"batch_size": 8}), steps_per_epoch=5,
        axis_name=None)
    labels = np.arange(2929) % 7
    networks = Networks(model, 128)
    state = create_train_state(
        jax.random.key(0), networks, optimizer,
        lambda k: BankMemory.create(k, labels, 7, 128), (224, 224, 3))
    step = jax.jit(functools.partial(make_train_step(networks, optimizer, config),
                                     class_weight=losses.class_weights(np.bincount(labels))),
                   donate_argnums=0)
    rng = np.random.default_rng(0)
    index = rng.choice(2929, 8, replace=False).astype(np.int32)
    b = {"image_student": rng.normal(size=(8, 224, 224, 3)).astype(np.float32),
         "image_teacher": rng.normal(size=(8, 224, 224, 3)).astype(np.float32),
         "label": labels[index].astype(np.int32), "index": index}
    state, metrics = step(state, b)
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1


def test_uint8_batch_is_augmented_in_the_step_with_the_example_keys():
    # The step's own views of a uint8 batch are `augment.two_views` under the documented
    # per-example keys: given as host views, the same images give the same step.
    from crckd_jax import augment
    from crckd_jax.step import example_keys

    _, state, step = build("queue")
    b = batch(5)
    raw = {"image": np.random.default_rng(5).integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8),
           "label": b["label"], "index": b["index"]}
    keys = example_keys(state.rng, state.step, jnp.asarray(b["index"]))[:, 2:]
    student, teacher_view = jax.jit(augment.two_views)(keys, raw["image"])
    views = {"image_student": student, "image_teacher": teacher_view,
             "label": b["label"], "index": b["index"]}
    after_raw, m_raw = step(state, raw)
    after_views, m_views = step(state, views)
    for k in ("loss", "ce", "mt", "ccd", "crp"):
        np.testing.assert_allclose(m_raw[k], m_views[k], rtol=1e-6, err_msg=k)
    for a, c in zip(jax.tree.leaves(after_raw.params), jax.tree.leaves(after_views.params)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
    assert not np.allclose(student, teacher_view)  # independent views


def test_eval_step_normalises_uint8_images_on_device():
    from crckd_jax import augment

    model, state, _ = build("queue")
    images = np.random.default_rng(4).integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8)
    run = jax.jit(functools.partial(eval_step, model=model))
    raw = run(state, {"image": images})
    floats = run(state, {"image": augment.normalize(images)})
    np.testing.assert_allclose(raw["probs"], floats["probs"], rtol=1e-6)


def build_with(kind, group_size, divisor=BATCH):
    """`build` with BatchNorm groups of `group_size` (0: the whole batch) and the MT
    divisor given."""
    from crckd_jax.models.batch_norm import BatchNormSettings

    model = CRCKDNet(densenet_config("densenet_tiny"), NUM_CLASSES, hidden_dim=32,
                     bn=BatchNormSettings(group_size=group_size))
    optimizer = make_optimizer(total_steps=10, max_lr=1e-3)
    config = small_step_config(batch_size=divisor)
    networks = Networks(model, DIM)
    state = create_train_state(jax.random.key(0), networks, optimizer, make_memory(kind),
                               (SIZE, SIZE, 3))
    class_weight = losses.class_weights(np.bincount(TRAIN_LABELS))
    return state, jax.jit(functools.partial(make_train_step(networks, optimizer, config),
                                            class_weight=class_weight))


def padded(b, layout):
    """`b` laid out by `layout` ([rows] of item positions, -1 = padding) with a mask; the
    padding holds other data (which must not matter)."""
    rng = np.random.default_rng(99)
    out = {}
    for key, value in b.items():
        filler = (rng.normal(size=value.shape[1:]) * 5).astype(value.dtype) \
            if value.dtype == np.float32 else np.zeros(value.shape[1:], value.dtype)
        out[key] = np.stack([value[i] if i >= 0 else filler for i in layout])
    out["mask"] = np.array([i >= 0 for i in layout])
    return out


@pytest.mark.parametrize("kind, groups", [("queue", 0), ("bank", 2)])
def test_masked_padding_changes_nothing(kind, groups):
    """A batch of 6 items padded to 8 with masked rows (a partial batch) trains as the 6
    items alone: losses, parameters, BatchNorm statistics, memory, two steps in a row.
    With 2 BatchNorm groups: groups of 4 with one padded row each against groups of 3.
    The masked BatchNorm sums weighted rows in another order, so values agree to float32
    rounding amplified through the network, not bit for bit: the small MT term (~3e-3)
    differed by 2.4e-5 relative; rtol 1e-4."""
    layout = [0, 1, 2, -1, 3, 4, 5, -1] if groups else [0, 1, 2, 3, 4, 5, -1, -1]
    state_a, step_a = build_with(kind, 3 if groups else 0)
    state_b, step_b = build_with(kind, 4 if groups else 0)
    for i in (1, 2):
        state_a, m_a = step_a(state_a, batch(i))
        state_b, m_b = step_b(state_b, padded(batch(i), layout))
        for term in ("loss", "ce", "mt", "ccd", "crp", "z_student", "z_teacher"):
            np.testing.assert_allclose(m_b[term], m_a[term], rtol=1e-4, err_msg=term)
    for part in ("params", "batch_stats", "ema_params", "ema_batch_stats", "memory"):
        for x, y in zip(jax.tree.leaves(getattr(state_b, part)),
                        jax.tree.leaves(getattr(state_a, part)), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6, err_msg=part)


def test_running_statistics_of_the_first_device_reach_every_device():
    """`running_stats_of_first_device`: every device gets device 0's values (the
    reference's DataParallel keeps the first GPU's buffers), not their mean."""
    from crckd_jax.collectives import of_first_device

    tree = {"mean": jnp.arange(12.0).reshape(4, 3), "var": jnp.arange(4.0) + 1}
    out = jax.vmap(lambda t: of_first_device(t, "d"), axis_name="d")(tree)
    np.testing.assert_array_equal(out["mean"], np.tile(np.arange(3.0), (4, 1)))
    np.testing.assert_array_equal(out["var"], np.ones(4))
