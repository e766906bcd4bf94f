"""DenseNet-BC (torchvision layout, NHWC) and the CRCKD classification network.

Module names mirror torchvision's ``DenseNet`` state_dict keys, so a torchvision checkpoint
maps onto the parameter tree by renaming (see ``crckd_jax.models.torch_import``)::

    features/conv0, features/norm0,
    features/denseblock{i}/denselayer{j}/{norm1, conv1, norm2, conv2},
    features/transition{i}/{norm, conv}, features/norm5

Initialisation follows torchvision: conv kernels ``kaiming_normal_`` (fan_in, gain sqrt(2),
untruncated normal), BatchNorm scale 1 / bias 0, Linear kernels torch's default
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` and Linear biases 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from crckd_jax.models.batch_norm import BatchNorm

# torch.nn.init.kaiming_normal_(w) defaults: mode='fan_in', nonlinearity='leaky_relu', a=0.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch.nn.Linear's default weight init: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class DenseNetConfig:
    """DenseNet-BC hyper-parameters, as in torchvision's ``DenseNet`` constructor."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int

    def __post_init__(self):
        # Accept lists / numpy values (e.g. read from an .npz) while staying hashable.
        object.__setattr__(self, "growth_rate", int(self.growth_rate))
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))
        object.__setattr__(self, "num_init_features", int(self.num_init_features))
        object.__setattr__(self, "bn_size", int(self.bn_size))

    @property
    def num_features(self) -> int:
        """Channels of the final feature map (input size of the classifier)."""
        channels = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            channels += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                channels //= 2
        return channels


DENSENET_PRESETS: dict[str, DenseNetConfig] = {
    "densenet121": DenseNetConfig(32, (6, 12, 24, 16), 64, 4),
    "densenet169": DenseNetConfig(32, (6, 12, 32, 32), 64, 4),
    "densenet201": DenseNetConfig(32, (6, 12, 48, 32), 64, 4),
    # Configuration of the torchvision parity fixture (tests/fixtures/densenet_small.npz).
    "densenet_small": DenseNetConfig(8, (2, 3, 2, 2), 16, 2),
    # Smallest useful network, for fast CPU tests.
    "densenet_tiny": DenseNetConfig(4, (1, 1, 1, 1), 8, 2),
}


def densenet_config(name: str) -> DenseNetConfig:
    """Returns the preset called ``name``; raises ValueError naming the known presets."""
    try:
        return DENSENET_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown DenseNet preset {name!r}; known presets: {sorted(DENSENET_PRESETS)}"
        ) from None


class _DenseLayer(nn.Module):
    growth_rate: int
    bn_size: int
    dtype: Any
    bn_axis_name: str | None

    @nn.compact
    def __call__(self, x, train: bool):
        bn = dict(use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype)
        conv = dict(use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init)
        y = nn.relu(BatchNorm(name="norm1", **bn)(x))
        y = nn.Conv(self.bn_size * self.growth_rate, (1, 1), name="conv1", **conv)(y)
        y = nn.relu(BatchNorm(name="norm2", **bn)(y))
        y = nn.Conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2", **conv)(y)
        return jnp.concatenate([x, y], axis=-1)


class _DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int
    dtype: Any
    bn_axis_name: str | None

    @nn.compact
    def __call__(self, x, train: bool):
        for j in range(self.num_layers):
            x = _DenseLayer(
                self.growth_rate, self.bn_size, self.dtype, self.bn_axis_name,
                name=f"denselayer{j + 1}",
            )(x, train)
        return x


class _Transition(nn.Module):
    num_output_features: int
    dtype: Any
    bn_axis_name: str | None

    @nn.compact
    def __call__(self, x, train: bool):
        x = BatchNorm(
            use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype,
            name="norm",
        )(x)
        x = nn.Conv(
            self.num_output_features, (1, 1), use_bias=False, dtype=self.dtype,
            kernel_init=conv_kernel_init, name="conv",
        )(nn.relu(x))
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNetFeatures(nn.Module):
    """torchvision ``DenseNet.features``: image [B, H, W, 3] -> feature map [B, h, w, F].

    ``h, w`` are about ``H/32, W/32`` (same output-size rounding as torch at each of the five
    stride-2 stages) and ``F = config.num_features``. The output is taken after ``norm5``,
    without the final ReLU, in ``dtype``. ``bn_axis_name`` synchronises every BatchNorm's
    batch statistics across that mapped axis.
    """

    config: DenseNetConfig
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        cfg = self.config

        def norm(name):
            return BatchNorm(
                use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype,
                name=name,
            )

        x = nn.Conv(
            cfg.num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
            use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init, name="conv0",
        )(x)
        x = nn.relu(norm("norm0")(x))
        # flax's max_pool pads with -inf, like torch's MaxPool2d.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        channels = cfg.num_init_features
        for i, num_layers in enumerate(cfg.block_config):
            x = _DenseBlock(
                num_layers, cfg.growth_rate, cfg.bn_size, self.dtype, self.bn_axis_name,
                name=f"denseblock{i + 1}",
            )(x, train)
            channels += num_layers * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                channels //= 2
                x = _Transition(
                    channels, self.dtype, self.bn_axis_name, name=f"transition{i + 1}"
                )(x, train)
        return norm("norm5")(x)


class CRCKDNet(nn.Module):
    """DenseNet backbone with CRCKD's two-layer head.

    ``__call__(x [B, H, W, 3], train)`` returns a dict of float32 arrays:

    * ``'pooled'`` [B, F]: spatial mean of ``relu(features(x))``;
    * ``'feature'`` [B, hidden_dim]: ``fc_layer(pooled)``, no activation (the embedding the
      distillation losses use);
    * ``'logits'`` [B, num_classes]: ``classifier(feature)``.

    The backbone runs in ``dtype``; the head always runs in float32.
    """

    config: DenseNetConfig
    num_classes: int
    hidden_dim: int = 128
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> dict[str, jnp.ndarray]:
        fmap = DenseNetFeatures(self.config, self.dtype, self.bn_axis_name, name="features")(
            x, train
        )
        pooled = jnp.mean(nn.relu(fmap.astype(jnp.float32)), axis=(1, 2))
        dense = dict(kernel_init=linear_kernel_init, bias_init=nn.initializers.zeros)
        feature = nn.Dense(self.hidden_dim, name="fc_layer", **dense)(pooled)
        logits = nn.Dense(self.num_classes, name="classifier", **dense)(feature)
        return {"pooled": pooled, "feature": feature, "logits": logits}
