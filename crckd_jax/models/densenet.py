"""DenseNet-BC (torchvision layout, NHWC) and the CRCKD classification network.

Module names mirror torchvision's ``DenseNet`` state_dict keys, so a torchvision checkpoint
maps onto the parameter tree by renaming (see ``crckd_jax.models.torch_import``)::

    features/conv0, features/norm0,
    features/denseblock{i}/denselayer{j}/{norm1, conv1, norm2, conv2},
    features/transition{i}/{norm, conv}, features/norm5

Initialisation follows torchvision: conv kernels ``kaiming_normal_`` (fan_in, gain sqrt(2),
untruncated normal), BatchNorm scale 1 / bias 0, Linear kernels torch's default
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` and Linear biases 0.

Kernels. Some layers have two implementations, chosen by the static ``kernels`` field that
`CRCKDNet` passes down to every layer (`crckd_jax.models.kernels.resolve_kernels`):

* ``'cpu'``: pieces tuned for XLA's CPU backend on a 2-core machine (docs/performance.md):
  the 3x3 convolutions' kernel gradient as one matrix product (`conv3x3`), the stem max-pool
  as nine strided slices whose gradient sits behind an optimisation barrier
  (`max_pool_3x3_s2`);
* ``'standard'``: the same layers with JAX's own differentiation: ``lax.conv_general_dilated``,
  a ``reduce_window`` max-pool (select-and-scatter gradient);
* ``'auto'`` (default): ``'cpu'`` for the CPU, ``'standard'`` for a GPU or TPU: the platform
  the run is compiled for (`crckd_jax.builder`), else JAX's default backend at trace time.

Both compute the same function, create the same variables (names, shapes, initialisers, RNG
streams) and give the same gradients up to float32 summation order (tested), so checkpoints
and torchvision imports do not depend on the choice. Shared by both: 1x1 convolutions as one
matrix product (`Conv1x1`; a GEMM is what cuBLAS and XLA's GPU emitters do best as well),
the transition's pooling before its 1x1 convolution, BatchNorm's hand-written backward
passes and its statistics computed once per part of a dense block
(`crckd_jax.models.batch_norm`, `_DenseBlock`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from crckd_jax.models.batch_norm import BatchNormSettings, concat_statistics
from crckd_jax.models.kernels import KERNELS, resolve_kernels  # noqa: F401 (re-exported)
from crckd_jax.models.presets import (DENSENET_PRESETS, DenseNetConfig,  # noqa: F401
                                      densenet_config)

# torch.nn.init.kaiming_normal_(w) defaults: mode='fan_in', nonlinearity='leaky_relu', a=0.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch.nn.Linear's default weight init: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv1x1(nn.Module):
    """A 1x1 convolution without bias, computed as one matrix product.

    Same variable as ``nn.Conv(features, (1, 1), use_bias=False)`` (``kernel`` [1, 1, in,
    out], same initialiser and RNG stream), so checkpoints and torch imports are unchanged.
    As a plain dot, its forward and both backward products go to the CPU's matrix-multiply
    kernels without the layout transposes XLA puts around a convolution's weight gradient;
    on a GPU they are GEMMs [B*H*W, in] x [in, out], which cuBLAS and XLA's GEMM fusions
    handle at least as well as a 1x1 convolution. So both ``kernels`` choices use it.
    """

    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            jnp.float32)
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype),
                    kernel[0, 0].astype(self.dtype))
        return y.reshape(*x.shape[:-1], self.features)


def avg_pool_2x2(x):
    """torch ``AvgPool2d(2, 2)`` (floor mode) on NHWC, as a reshape and a mean."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=jnp.float32).astype(
        x.dtype)


@jax.custom_vjp
def max_pool_3x3_s2(x):
    """torch ``MaxPool2d(3, stride=2, padding=1)`` on NHWC: the max of nine strided slices
    (the ``kernels='cpu'`` stem pool; `max_pool_3x3_s2_standard` is the other).

    Same values as ``nn.max_pool`` (padding with -inf). Its gradient is built from
    elementwise maxima instead of XLA's select-and-scatter, which is several times slower
    on CPU; the two differ only where a window holds several equal maxima (the gradient is
    then shared among them rather than given to one). In DenseNet the input is a ReLU
    output, whose ties are zeros, where the ReLU passes no gradient anyway. The incoming
    gradient is materialised first (an optimisation barrier): otherwise XLA fuses the whole
    gradient of the first dense block into this op and computes it nine times.
    """
    return _max_pool_3x3_s2(x)


def _max_pool_fwd(x):
    return _max_pool_3x3_s2(x), x


def _max_pool_bwd(x, g):
    _, vjp = jax.vjp(_max_pool_3x3_s2, x)
    return vjp(lax.optimization_barrier(g))


def _max_pool_3x3_s2(x):
    b, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out = None
    for i in range(3):
        for j in range(3):
            window = padded[:, i: i + 2 * ho - 1: 2, j: j + 2 * wo - 1: 2]
            out = window if out is None else jnp.maximum(out, window)
    return out


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_s2_standard(x):
    """The same pooling as `max_pool_3x3_s2` as one ``reduce_window`` (padding -inf), with
    JAX's gradient (select-and-scatter: a tied maximum gets the whole gradient). Compiled
    for an H200 it keeps int32 window indices for the backward pass; `max_pool_3x3_s2` there
    moves 0.3 GiB less per DenseNet-121 step but keeps 0.17 GiB more temporaries
    (docs/performance.md), so the GPU keeps this one."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def conv3x3(x, kernel):
    """3x3 convolution, stride 1, padding 1, NHWC x [B, H, W, I], HWIO kernel [3, 3, I, O]
    (the ``kernels='cpu'`` version; ``'standard'`` differentiates `_conv3x3` directly).

    The forward pass and the input gradient are XLA's convolutions. The kernel gradient is
    one matrix product ``x^T [BHW, I] @ D [BHW, 9 O]``, where D stacks the nine shifted
    copies of the output gradient: XLA would compute it as a convolution of transposed
    operands, and the transposes (batch moved innermost) cost more on CPU than the product.
    """
    return _conv3x3(x, kernel)


def _conv3x3(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv3x3_fwd(x, kernel):
    return _conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
    x, kernel = residuals
    b, h, w, i = x.shape
    o = kernel.shape[-1]
    _, vjp_x = jax.vjp(lambda x_: _conv3x3(x_, kernel), x)
    (dx,) = vjp_x(g)
    # dW[kh, kw] = sum over pixels q of x[q]^T g[q - (kh, kw) + 1] (g zero outside).
    g_pad = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = jnp.stack([g_pad[:, 2 - kh: 2 - kh + h, 2 - kw: 2 - kw + w]
                         for kh in range(3) for kw in range(3)], axis=3)
    dw = lax.dot_general(x.reshape(-1, i), shifted.reshape(-1, 9 * o),
                         (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)  # [I, 9 O]
    dw = dw.reshape(i, 3, 3, o).transpose(1, 2, 0, 3).astype(kernel.dtype)
    return dx, dw


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
    """A 3x3 convolution without bias, padding 1: `conv3x3` with ``kernels='cpu'``, a plain
    ``lax.conv_general_dilated`` with JAX's gradient with ``'standard'``.

    Same variable as ``nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)),
    use_bias=False)`` (``kernel`` [3, 3, in, out], same initialiser and RNG stream).
    """

    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = conv_kernel_init
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                            jnp.float32)
        conv = conv3x3 if resolve_kernels(self.kernels) == "cpu" else _conv3x3
        return conv(x.astype(self.dtype), kernel.astype(self.dtype))


class _DenseLayer(nn.Module):
    """One dense layer: the block's features so far [B, H, W, C] -> its new features
    [B, H, W, growth_rate]. ``statistics``: the batch statistics of the input in training
    mode (known from when each part of it was produced), None in eval mode."""

    growth_rate: int
    bn_size: int
    dtype: Any
    bn: BatchNormSettings
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, statistics, train: bool, mask=None):
        y = nn.relu(self.bn.layer(train, self.dtype, "norm1")(x, mask=mask,
                                                              statistics=statistics))
        y = Conv1x1(self.bn_size * self.growth_rate, self.dtype, name="conv1")(y)
        y = nn.relu(self.bn.layer(train, self.dtype, "norm2")(y, mask=mask))
        return Conv3x3(self.growth_rate, self.dtype, kernels=self.kernels, name="conv2")(y)


class _DenseBlock(nn.Module):
    """x [B, H, W, C] -> (the concatenation of x and every layer's new features [B, H, W,
    C + num_layers * growth_rate], its batch statistics in training mode, else None).

    The statistics of each part are computed once, when it is produced, and every later
    BatchNorm over the concatenation (the following layers' ``norm1``, the transition's or the
    final ``norm5``) takes them instead of reading its whole input again: per-channel batch
    statistics do not depend on the consumer, also per group of items or with a mask.
    """

    num_layers: int
    growth_rate: int
    bn_size: int
    dtype: Any
    bn: BatchNormSettings
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        parts, statistics = [x], [self.bn.statistics(x, mask)] if train else None
        for j in range(self.num_layers):
            y = _DenseLayer(
                self.growth_rate, self.bn_size, self.dtype, self.bn, self.kernels,
                name=f"denselayer{j + 1}",
            )(jnp.concatenate(parts, axis=-1),
              concat_statistics(statistics) if train else None, train, mask)
            parts.append(y)
            if train:
                statistics.append(self.bn.statistics(y, mask))
        return (jnp.concatenate(parts, axis=-1),
                concat_statistics(statistics) if train else None)


class _Transition(nn.Module):
    num_output_features: int
    dtype: Any
    bn: BatchNormSettings
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, statistics, train: bool, mask=None):
        x = self.bn.layer(train, self.dtype, "norm")(x, mask=mask, statistics=statistics)
        # torch: conv then pool. Both are linear and act per pixel / per channel, so
        # pooling first gives the same values with a 1x1 convolution on 4x fewer pixels.
        return Conv1x1(self.num_output_features, self.dtype, name="conv")(
            avg_pool_2x2(nn.relu(x)))


class DenseNetFeatures(nn.Module):
    """torchvision ``DenseNet.features``: image [B, H, W, 3] -> feature map [B, h, w, F].

    ``h, w`` are about ``H/32, W/32`` (same output-size rounding as torch at each of the five
    stride-2 stages) and ``F = config.num_features``. The output is taken after ``norm5``,
    without the final ReLU, in ``dtype``. ``bn`` holds what every BatchNorm shares (synchronising
    axis, statistics groups, momentum). ``double_update_until_block`` = i > 0: the layers from
    ``norm0`` to the end of ``denseblock{i}`` update their running statistics as if twice
    per step with the same batch (momentum 1 - (1 - m)^2), which is what the reference's
    second pass of ``features[0:9]`` (up to ``denseblock3``) does. ``kernels``: 'auto' |
    'cpu' | 'standard' (see the module docstring); it changes how gradients are computed,
    not the variables.
    """

    config: DenseNetConfig
    dtype: Any = jnp.float32
    bn: BatchNormSettings = BatchNormSettings()
    double_update_until_block: int = 0
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None = None
                 ) -> jnp.ndarray:
        cfg = self.config
        kernels = resolve_kernels(self.kernels)  # resolved once, at trace time
        twice = dataclasses.replace(self.bn, momentum=1.0 - (1.0 - self.bn.momentum) ** 2)
        # The settings of stage i (0: the stem, i: denseblock i and the transition after it).
        stage_bn = lambda i: twice if i < self.double_update_until_block else self.bn

        x = nn.Conv(
            cfg.num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
            use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init, name="conv0",
        )(x)
        x = nn.relu(stage_bn(0).layer(train, self.dtype, "norm0")(x, mask=mask))
        x = max_pool_3x3_s2(x) if kernels == "cpu" else max_pool_3x3_s2_standard(x)
        channels = cfg.num_init_features
        for i, num_layers in enumerate(cfg.block_config):
            x, statistics = _DenseBlock(
                num_layers, cfg.growth_rate, cfg.bn_size, self.dtype, stage_bn(i), kernels,
                name=f"denseblock{i + 1}",
            )(x, train, mask)
            channels += num_layers * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                channels //= 2
                x = _Transition(
                    channels, self.dtype, stage_bn(i + 1), kernels,
                    name=f"transition{i + 1}",
                )(x, statistics, train, mask)
        return stage_bn(len(cfg.block_config)).layer(train, self.dtype, "norm5")(
            x, mask=mask, statistics=statistics)


class CRCKDNet(nn.Module):
    """DenseNet backbone with CRCKD's two-layer head.

    ``__call__(x [B, H, W, 3], train)`` returns a dict of float32 arrays:

    * ``'pooled'`` [B, F]: spatial mean of ``relu(features(x))``;
    * ``'feature'`` [B, hidden_dim]: ``fc_layer(pooled)``, no activation (the embedding the
      distillation losses use);
    * ``'logits'`` [B, num_classes]: ``classifier(feature)``.

    The backbone runs in ``dtype``; the head always runs in float32. ``bn`` and
    ``double_update_until_block``: the backbone's BatchNorm settings (`DenseNetFeatures`).
    ``kernels`` ('auto', 'cpu' or 'standard') picks the backbone's layer implementations
    (module docstring); 'auto' follows JAX's default backend. ``mask`` [B] bool (training
    mode): the items that enter the BatchNorm statistics (padding of a partial batch left
    out).
    """

    config: DenseNetConfig
    num_classes: int
    hidden_dim: int = 128
    dtype: Any = jnp.float32
    bn: BatchNormSettings = BatchNormSettings()
    double_update_until_block: int = 0
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, mask: jnp.ndarray | None = None
                 ) -> dict[str, jnp.ndarray]:
        fmap = DenseNetFeatures(self.config, self.dtype, self.bn, self.double_update_until_block,
                                self.kernels, name="features")(x, train, mask)
        pooled = jnp.mean(nn.relu(fmap.astype(jnp.float32)), axis=(1, 2))
        dense = dict(kernel_init=linear_kernel_init, bias_init=nn.initializers.zeros)
        feature = nn.Dense(self.hidden_dim, name="fc_layer", **dense)(pooled)
        logits = nn.Dense(self.num_classes, name="classifier", **dense)(feature)
        return {"pooled": pooled, "feature": feature, "logits": logits}
