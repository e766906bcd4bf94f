"""CCD (class-guided contrastive distillation) and CRP (categorical relation preserving).

One call of `ccd_crp` is one call of the reference's `CCD_CRP_Loss.forward`: project both
features, score them against the memory as it was before the call, set Z on first use,
take the NCE losses, write the batch into the memory, and compute CRP against the class
centroids of the updated memory. Shapes: B batch, L = P + K, d embedding width.

Under data parallelism (`axis_name` set) each device scores its own items; Z is set from
the mean score over all devices, and the memory is updated with the all-gathered batch
(gathered in device order, so every device writes the same rows in the same order).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from crckd_jax import losses
from crckd_jax.collectives import all_gather, pmean, psum
from crckd_jax.memory import Memory
from crckd_jax.settings import MemorySettings


class ContrastConfig(NamedTuple):
    """Static settings of CCD/CRP: P, K, tau, memory momentum m, and the Z rule.

    z_momentum 0 freezes Z once set (the reference); a value in (0, 1) instead tracks
    `Z <- z_momentum * Z + (1 - z_momentum) * estimate` at every call.
    """

    num_positives: int
    num_negatives: int
    temperature: float
    momentum: float
    z_momentum: float

    @classmethod
    def from_settings(cls, memory: MemorySettings) -> "ContrastConfig":
        """The contrast part of the `memory` settings."""
        return cls(num_positives=memory.num_positives, num_negatives=memory.num_negatives,
                   temperature=memory.temperature, momentum=memory.momentum,
                   z_momentum=memory.z_momentum)


class CcdCrpOutput(NamedTuple):
    """Per-term losses, the scores and what the memory and CRP saw (for tests and logs)."""

    loss_ccd: jax.Array
    loss_crp: jax.Array
    loss_s: jax.Array
    loss_t: jax.Array
    embed_s: jax.Array
    embed_t: jax.Array
    out_s: jax.Array
    out_t: jax.Array
    centroids_s: jax.Array
    centroids_t: jax.Array


def normalise_scores(u, z, num_rows, z_momentum, axis_name=None, mask=None):
    """Z-normalised scores `u / Z` and the new Z; Z = M * mean(u) when unset (< 0).

    u [B, L] raw exp-scores; z float32 scalar; mask [B] bool: the rows averaged (all when
    None). Z is a constant for autodiff.
    """
    if mask is None:
        mean = pmean(jnp.mean(u), axis_name)
    else:
        total = jnp.sum(jnp.where(mask[:, None], u, 0.0))
        mean = psum(total, axis_name) / (psum(jnp.sum(mask), axis_name) * u.shape[1])
    estimate = jax.lax.stop_gradient(num_rows * mean)
    tracked = z_momentum * z + (1.0 - z_momentum) * estimate if z_momentum else z
    z_new = jnp.where(z < 0, estimate, tracked).astype(jnp.float32)
    return u / z_new, z_new


def contrast_scores(memory_rows, embed, contrast_idx, temperature):
    """`exp(<rows[idx[b, j]], embed[b]> / tau)`: [B, L] from rows [M, d], embed [B, d].

    Computed as one [B, M] matmul and a gather of the needed entries, which is much faster
    than gathering B x L rows first and gives the same values. No gradient to the rows.
    """
    logits = embed @ jax.lax.stop_gradient(memory_rows).T
    picked = jnp.take_along_axis(logits, contrast_idx, axis=1)
    return jnp.exp(picked / jnp.float32(temperature))


def ccd_crp(
    embed_s: jax.Array,
    embed_t: jax.Array,
    memory: Memory,
    labels: jax.Array,
    index: jax.Array,
    contrast_idx: jax.Array,
    config: ContrastConfig,
    axis_name: str | None = None,
    mask: jax.Array | None = None,
) -> tuple[CcdCrpOutput, Memory]:
    """CCD and CRP losses for one batch, and the updated memory.

    embed_s, embed_t: [B, d] unit embeddings of student and teacher; labels, index [B];
    contrast_idx [B, P + K] row ids into `memory.rows()`. Student embeddings are scored
    against the teacher rows (out_s, the reference's out_v1) and teacher embeddings
    against the student rows (out_t, out_v2). Gradient reaches embed_s from both losses
    and embed_t from its NCE loss only. Without `mask` the losses are this device's batch
    means; with `mask` [B] bool (a partial batch's padding False) they are this device's
    share of the mean over the unmasked items of all devices, and only those items are
    written to the memory.
    """
    count = None if mask is None else psum(jnp.sum(mask).astype(jnp.float32), axis_name)
    rows_s, rows_t = memory.rows()
    u_s = contrast_scores(rows_t, embed_s, contrast_idx, config.temperature)
    u_t = contrast_scores(rows_s, embed_t, contrast_idx, config.temperature)
    n = memory.num_items
    out_s, z_s = normalise_scores(u_s, memory.z_student, n, config.z_momentum, axis_name,
                                  mask)
    out_t, z_t = normalise_scores(u_t, memory.z_teacher, n, config.z_momentum, axis_name,
                                  mask)
    noise = config.num_negatives / n
    loss_s = losses.nce_loss(out_s, config.num_positives, noise, mask, count)
    loss_t = losses.nce_loss(out_t, config.num_positives, noise, mask, count)

    new_memory = memory.replace(z_student=z_s, z_teacher=z_t).update(
        all_gather(jax.lax.stop_gradient(embed_s), axis_name),
        all_gather(jax.lax.stop_gradient(embed_t), axis_name),
        all_gather(labels, axis_name),
        all_gather(index, axis_name),
        config.momentum,
        None if mask is None else all_gather(mask, axis_name),
    )
    cent_s, cent_t = new_memory.centroids()
    loss_crp = losses.crp_loss(embed_s, embed_t, cent_s, cent_t, config.temperature, mask,
                               count)
    output = CcdCrpOutput(
        loss_ccd=loss_s + loss_t, loss_crp=loss_crp, loss_s=loss_s, loss_t=loss_t,
        embed_s=embed_s, embed_t=embed_t, out_s=out_s, out_t=out_t,
        centroids_s=cent_s, centroids_t=cent_t)
    return output, new_memory
