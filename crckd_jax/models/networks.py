"""Every trainable network of a CRCKD run, declared once (`Networks`).

As in big_vision's distillation trainer, the parameters are a dict with one entry per
network: ``{'student': the CRCKDNet's params, 'embed_s': the CCD projection of the student's
features, 'embed_t': the CCD projection of the teacher's features}``; the optimizer updates
all three. The teacher (the mean teacher, an EMA of ``params['student']``) is a second
CRCKDNet of the same shape; its embeddings come from ``params['embed_t']``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from crckd_jax import losses
from crckd_jax.models.densenet import CRCKDNet, linear_kernel_init

NETWORK_KEYS = ("student", "embed_s", "embed_t")  # the entries of `params`


def torch_linear_bias_init(key, shape, dtype=jnp.float32, fan_in: int = 1):
    """torch `nn.Linear`'s bias initialisation: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Embed(nn.Module):
    """The CCD projection: `l2_normalize(x @ kernel + bias)`, x [B, in] -> [B, dim].

    Initialised like torch's `nn.Linear` (uniform in +-1/sqrt(in)), as the reference.
    """

    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        fan_in = x.shape[-1]
        kernel = self.param("kernel", linear_kernel_init, (fan_in, self.dim))
        bias = self.param(
            "bias", lambda k, s: torch_linear_bias_init(k, s, fan_in=fan_in), (self.dim,))
        return losses.l2_normalize(x @ kernel + bias)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The student's (and teacher's) CRCKDNet and the two CCD projections to `embed_dim`.

    `network.apply` runs the student (params['student']) or the teacher (its EMA params);
    `embed` runs the projections; `init` creates all of them.
    """

    network: CRCKDNet
    embed_dim: int

    def init(self, keys: dict[str, jax.Array], image_shape: tuple[int, int, int]
             ) -> tuple[dict, dict, dict]:
        """(params, batch_stats, teacher_params): fresh parameters from one key per entry
        of `NETWORK_KEYS`; images [B, *image_shape].

        The teacher has the student's backbone (the `features` subtree, which
        `model.pretrained` loads into both) and a head of its own, as the reference's
        second network has: its first EMA update, at alpha 0, copies the student, but its
        step-0 outputs come from its own head, and they set the teacher-side Z and the
        first teacher memory rows.
        """
        images = jnp.zeros((2, *image_shape), jnp.float32)
        student_key = keys["student"]
        variables = self.network.init(student_key, images, train=False)
        # Only the head of this second initialisation is kept, and XLA drops the rest: the
        # compiled init stays the size of one network's.
        head = self.network.init(jax.random.fold_in(student_key, 1), images,
                                 train=False)["params"]
        teacher_params = {**head, "features": variables["params"]["features"]}
        feature = jax.eval_shape(
            lambda v: self.network.apply(v, images, train=False), variables)["feature"]
        features = jnp.zeros(feature.shape, jnp.float32)
        params = {"student": variables["params"]}
        for side in ("embed_s", "embed_t"):
            params[side] = Embed(self.embed_dim).init(keys[side], features)["params"]
        return params, variables["batch_stats"], teacher_params

    def embed(self, params: dict, feature_s: jax.Array, feature_t: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
        """Unit CCD embeddings [B, embed_dim] of the student's and the teacher's features
        [B, F] (`params['embed_s']`, `params['embed_t']`)."""
        embed = Embed(self.embed_dim)
        return (embed.apply({"params": params["embed_s"]}, feature_s),
                embed.apply({"params": params["embed_t"]}, feature_t))
