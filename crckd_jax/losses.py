"""The CRCKD objective's terms, as pure functions of arrays.

Shapes: B batch, C classes, L = P + K contrast columns (P positives first, then K
negatives), d embedding width. Every formula follows the reference implementation
(`utils/losses.py`, `utils/ramps.py`, `utils/CCD_CRP_loss.py` of the authors' code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NCE_EPS = 1e-7  # the reference's epsilon inside the NCE logarithms


def l2_normalize(x: jax.Array) -> jax.Array:
    """Row-wise `x / ||x||_2` with no epsilon, as `torch`'s `x.div(x.norm(dim=1))`. [B, d]."""
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def class_weights(class_counts: jax.Array) -> jax.Array:
    """`w_c = sum(counts) / counts[c]`: [C] float32 from [C] training-set class counts."""
    counts = jnp.asarray(class_counts, jnp.float32)
    return jnp.sum(counts) / counts


def item_weights(weight: jax.Array, labels: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
    """[B] class weight of each item (`weight[labels]`), 0 where `mask` is False."""
    return weight[labels] if mask is None else jnp.where(mask, weight[labels], 0.0)


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weight: jax.Array,
    normaliser: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Class-weighted cross-entropy with torch's weighted-mean reduction.

    `sum_i w[y_i] * nll_i / sum_i w[y_i]`; logits [B, C], labels [B] int, weight [C].
    `normaliser` replaces the denominator, e.g. by the weight sum of a whole global batch
    of which this is one device's part. `mask` [B] bool: only those items count.
    """
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    w = item_weights(weight, labels, mask)
    weighted = w * nll if mask is None else jnp.where(mask, w * nll, 0.0)
    return jnp.sum(weighted) / (jnp.sum(w) if normaliser is None else normaliser)


def softmax_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, divisor: float | jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean-teacher consistency: `sum(q * (log q - log_softmax(s))) / divisor`.

    q = softmax(teacher) is the target (no gradient); logits [B, C]. The reference divides
    by the configured batch size, not by the rows present, hence the explicit divisor.
    `mask` [B] bool: only those rows are summed.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_q = jax.nn.log_softmax(teacher_logits)
    q = jnp.exp(log_q)
    terms = q * (log_q - jax.nn.log_softmax(student_logits))
    if mask is not None:
        terms = jnp.where(mask[:, None], terms, 0.0)
    return jnp.sum(terms) / divisor


def sigmoid_rampup(epoch: jax.Array | float, length: float) -> jax.Array:
    """`exp(-5 (1 - clip(epoch, 0, length) / length)^2)`; 1 when length == 0."""
    if length == 0:
        return jnp.ones_like(jnp.asarray(epoch, jnp.float32))
    phase = 1.0 - jnp.clip(jnp.asarray(epoch, jnp.float32), 0.0, length) / length
    return jnp.exp(-5.0 * phase * phase)


def nce_loss(scores: jax.Array, num_positives: int, noise_constant: float,
             mask: jax.Array | None = None, count: jax.Array | None = None) -> jax.Array:
    """The reference's NCE loss over Z-normalised scores [B, L].

    With c = K / N: positives log(x / (x + c + eps)) averaged over B and P; negatives
    log(c / (x + c + eps)) summed over the K columns and averaged over B. With `mask` [B]
    bool and `count` (the items averaged over, e.g. the unmasked ones of all devices): the
    unmasked rows' sums divided by `count` instead of B.
    """
    batch = scores.shape[0] if count is None else count
    pos, neg = scores[:, :num_positives], scores[:, num_positives:]
    log_pos = jnp.log(pos / (pos + noise_constant + NCE_EPS))
    log_neg = jnp.log(noise_constant / (neg + noise_constant + NCE_EPS))
    if mask is not None:
        log_pos = jnp.where(mask[:, None], log_pos, 0.0)
        log_neg = jnp.where(mask[:, None], log_neg, 0.0)
    return -(jnp.sum(log_pos) / (batch * num_positives) + jnp.sum(log_neg) / batch)


def crp_loss(
    embed_s: jax.Array,
    embed_t: jax.Array,
    centroids_s: jax.Array,
    centroids_t: jax.Array,
    temperature: float,
    mask: jax.Array | None = None,
    count: jax.Array | None = None,
) -> jax.Array:
    """Categorical relation preserving: KL(softmax(R_t) || softmax(R_s)), batch mean.

    R = embed @ l2_normalize(centroids).T / temperature, embed [B, d], centroids [C, d].
    The centroids and the whole teacher relation are constants; gradient reaches embed_s.
    With `mask` [B] and `count`: the unmasked rows' sum divided by `count`.
    """
    centroids_s = jax.lax.stop_gradient(l2_normalize(centroids_s))
    centroids_t = jax.lax.stop_gradient(l2_normalize(centroids_t))
    rel_s = embed_s @ centroids_s.T / temperature
    rel_t = jax.lax.stop_gradient(embed_t @ centroids_t.T / temperature)
    return softmax_kl(rel_s, rel_t, embed_s.shape[0] if count is None else count, mask)
