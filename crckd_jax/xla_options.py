"""XLA compiler options of the CRCKD step, in one place.

Two ways to apply them, both measured on the development CPU (see docs/performance.md):

* `configure()` appends the flags to ``XLA_FLAGS``. It must run before JAX creates its
  backends (before the first computation), so call it at the top of an entry point, before
  ``import jax`` where possible. Flags already present in ``XLA_FLAGS`` are left as they are,
  so a user's own setting always wins.
* `compiler_options(platform)` returns the same choices as a dict for one executable:
  ``jax.jit(f, compiler_options=...)`` or ``jit(f).lower(...).compile(compiler_options=...)``.

CPU: XLA's CPU backend sends convolutions, dots and reductions to YNNPACK by default. Sending
convolutions and dots to oneDNN (``onednn_custom_call``) while YNNPACK keeps only the
reductions (``ynn_fusion_type=reduce``) made a DenseNet-121 train step ~10% faster; oneDNN
with YNNPACK fully off was slower. GPU: no option is needed by default (cuDNN and cuBLAS are
autotuned by XLA); the dict is empty.
"""

from __future__ import annotations

import os

# Flag name -> value, as written in XLA_FLAGS.
CPU_FLAGS: dict[str, str] = {
    "xla_cpu_experimental_onednn_custom_call": "true",
    "xla_cpu_experimental_ynn_fusion_type": "reduce",
}
GPU_FLAGS: dict[str, str] = {}

# The same choices in the form `compiler_options` expects (enum values by their proto name).
_CPU_OPTIONS: dict[str, object] = {
    "xla_cpu_experimental_onednn_custom_call": True,
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}


def xla_flags(platform: str = "cpu") -> list[str]:
    """The flags of `platform` ('cpu' or 'gpu') as ``--name=value`` strings."""
    flags = {"cpu": CPU_FLAGS, "gpu": GPU_FLAGS}[platform]
    return [f"--{name}={value}" for name, value in flags.items()]


def configure(platforms: tuple[str, ...] = ("cpu", "gpu"), environ=None) -> str:
    """Appends the flags of `platforms` to ``XLA_FLAGS`` (unless already set there).

    Call before JAX initialises its backends. Returns the resulting ``XLA_FLAGS`` value.
    Setting ``CRCKD_XLA_OPTIONS=none`` in the environment turns this off (for baselines).
    """
    environ = os.environ if environ is None else environ
    if environ.get("CRCKD_XLA_OPTIONS", "").lower() == "none":
        return environ.get("XLA_FLAGS", "")
    current = environ.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0].lstrip("-") for f in current.split()}
    added = [f for p in platforms for f in xla_flags(p)
             if f.split("=", 1)[0].lstrip("-") not in present]
    value = " ".join([current, *added]).strip()
    environ["XLA_FLAGS"] = value
    return value


def compiler_options(platform: str | None = None) -> dict[str, object]:
    """Per-executable compiler options for `platform` (default: JAX's default backend)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return dict(_CPU_OPTIONS) if platform == "cpu" else {}
