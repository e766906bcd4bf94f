"""Which implementation of the CPU-tuned layers a model traces: 'cpu' or 'standard'.

The DenseNet (`crckd_jax.models.densenet`) and its BatchNorm (`crckd_jax.models.batch_norm`)
carry a static ``kernels`` field: ``'cpu'`` selects hand-written gradients tuned for XLA's CPU
backend, ``'standard'`` JAX's own differentiation of the same functions, and ``'auto'`` (the
default) resolves to ``'cpu'`` when JAX's default backend is the CPU and to ``'standard'`` on
GPU and TPU, when the model is traced.
"""

from __future__ import annotations

import jax

KERNELS = ("auto", "cpu", "standard")


def resolve_kernels(kernels: str, platform: str | None = None) -> str:
    """``'cpu'`` or ``'standard'``: ``kernels`` itself, or for ``'auto'`` the choice for the
    platform the program is compiled for (default: JAX's default backend): ``'cpu'`` on the
    CPU, ``'standard'`` on GPU and TPU."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {KERNELS}")
    if kernels == "auto":
        return "cpu" if (platform or jax.default_backend()) == "cpu" else "standard"
    return kernels
