"""CCD + CRP against a float64 NumPy transcription of the reference, on shapes the
fixtures do not have: student and teacher widths that differ, a class with exactly P
items, negatives drawn with replacement, and a non-first call (Z already set)."""

import jax
import jax.numpy as jnp
import numpy as np

from crckd_jax.distillation import ContrastConfig, ccd_crp
from crckd_jax.models.networks import Embed
from crckd_jax.memory import BankMemory, with_anchor_column


def norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(f_s, f_t, ws, bs, wt, bt, m1, m2, z1, z2, labels_all, index, idx, P, K, tau, m):
    e_s, e_t = norm(f_s @ ws.T + bs), norm(f_t @ wt.T + bt)
    u1 = np.exp(np.einsum("bld,bd->bl", m2[idx], e_s) / tau)
    u2 = np.exp(np.einsum("bld,bd->bl", m1[idx], e_t) / tau)
    n = len(labels_all)
    z1 = n * u1.mean() if z1 < 0 else z1
    z2 = n * u2.mean() if z2 < 0 else z2
    c = K / n

    def nce(x):
        pos = np.log(x[:, :P] / (x[:, :P] + c + 1e-7)).sum() / (x.shape[0] * P)
        return -(pos + np.log(c / (x[:, P:] + c + 1e-7)).sum() / x.shape[0])

    loss_s, loss_t = nce(u1 / z1), nce(u2 / z2)
    m1, m2 = m1.copy(), m2.copy()
    m1[index] = norm(m * m1[index] + (1 - m) * e_s)
    m2[index] = norm(m * m2[index] + (1 - m) * e_t)
    classes = np.arange(labels_all.max() + 1)
    a_s = np.stack([np.maximum(m1[labels_all == k], 0).mean(0) for k in classes])
    a_t = np.stack([np.maximum(m2[labels_all == k], 0).mean(0) for k in classes])
    r_s, r_t = e_s @ norm(a_s).T / tau, e_t @ norm(a_t).T / tau
    log_p = r_s - np.log(np.exp(r_s).sum(1, keepdims=True))
    log_q = r_t - np.log(np.exp(r_t).sum(1, keepdims=True))
    crp = (np.exp(log_q) * (log_q - log_p)).sum() / len(f_s)
    return dict(loss_s=loss_s, loss_t=loss_t, crp=crp, m1=m1, m2=m2, z1=z1, z2=z2)


def test_ccd_crp_other_shapes_against_float64_transcription():
    rng = np.random.default_rng(7)
    P, K, d, s_dim, t_dim, B = 3, 40, 16, 24, 40, 6
    labels_all = np.array([0] * 20 + [1] * 3 + [2] * 7)  # class 1 has exactly P items
    rng.shuffle(labels_all)
    n = len(labels_all)
    memory = BankMemory.create(jax.random.key(1), labels_all, 3, d)
    memory = memory.replace(z_student=jnp.float32(55.0), z_teacher=jnp.float32(-1.0))
    index = rng.choice(n, B, replace=False)
    labels = labels_all[index]
    keys = jax.random.split(jax.random.key(2), B)
    idx = memory.sample_contrast(keys, jnp.asarray(labels), jnp.asarray(index), P, K)
    f_s = rng.normal(size=(B, s_dim)).astype(np.float32)
    f_t = rng.normal(size=(B, t_dim)).astype(np.float32)
    p_s = Embed(d).init(jax.random.key(3), jnp.asarray(f_s))["params"]
    p_t = Embed(d).init(jax.random.key(4), jnp.asarray(f_t))["params"]
    e_s = Embed(d).apply({"params": p_s}, f_s)
    e_t = Embed(d).apply({"params": p_t}, f_t)
    config = ContrastConfig(num_positives=P, num_negatives=K, temperature=0.07, momentum=0.5,
                            z_momentum=0.0)
    out, new = ccd_crp(e_s, e_t, memory, jnp.asarray(labels), jnp.asarray(index), idx, config)

    f64 = lambda x: np.asarray(x, np.float64)
    want = reference(f64(f_s), f64(f_t), f64(p_s["kernel"]).T, f64(p_s["bias"]),
                     f64(p_t["kernel"]).T, f64(p_t["bias"]), f64(memory.student),
                     f64(memory.teacher), 55.0, -1.0, labels_all, index, np.asarray(idx),
                     P, K, float(np.float32(0.07)), 0.5)
    np.testing.assert_array_equal(np.asarray(idx)[:, 0], index)
    np.testing.assert_allclose(out.loss_s, want["loss_s"], rtol=1e-5)
    np.testing.assert_allclose(out.loss_t, want["loss_t"], rtol=1e-5)
    np.testing.assert_allclose(out.loss_crp, want["crp"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.student, want["m1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.teacher, want["m2"], rtol=1e-5, atol=1e-6)
    assert float(new.z_student) == 55.0
    np.testing.assert_allclose(new.z_teacher, want["z2"], rtol=1e-5)


def test_anchor_column_overwrite():
    idx = jnp.arange(12).reshape(3, 4)
    out = with_anchor_column(idx, jnp.array([7, 8, 9]))
    np.testing.assert_array_equal(out[:, 0], [7, 8, 9])
    np.testing.assert_array_equal(out[:, 1:], np.asarray(idx)[:, 1:])
