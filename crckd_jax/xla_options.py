"""XLA compiler options and JAX's persistent compilation cache, in one place.

Options. Only the CPU backend gets any, and by default none: XLA's own CPU defaults
(convolutions, dots and reductions in YNNPACK) with a persistent compilation cache that
works. The alternative, measured on the development CPUs (docs/performance.md), is
``CRCKD_XLA_OPTIONS=onednn``: convolutions and dots in oneDNN
(``--xla_cpu_experimental_onednn_custom_call=true``) with YNNPACK kept for the reductions
(``--xla_cpu_experimental_ynn_fusion_type=reduce``). It makes a DenseNet-121 train step ~5 %
faster on the AMD EPYC (AVX2) machines (~10 % on the Intel AVX-512 ones), but XLA cannot
serialise executables that hold oneDNN calls (its CPU thunk serialiser treats oneDNN's
thunk, which reports itself as a custom call, as one: ``std::bad_alloc``), so no train,
eval or init executable reaches the persistent cache and every start compiles everything
again (DenseNet-121 at 224 px: ~2 minutes there). Worth it only for long CPU runs.

* `configure()` adds the chosen flags to ``XLA_FLAGS``. It must run before JAX creates its
  backends (before the first computation), so call it at the top of an entry point, before
  ``import jax`` where possible. Flags already in ``XLA_FLAGS`` are left as they are, so a
  user's own setting always wins. The flags are ``xla_cpu_*`` flags: they are added only
  when JAX is going to use the CPU (`expected_backend`); on a GPU or TPU nothing is added.
* `compiler_options(platform)` returns the same choices as a dict for one executable:
  ``jax.jit(f, compiler_options=...)`` or ``jit(f).lower(...).compile(compiler_options=...)``.
* `enable_compilation_cache(directory)` turns on JAX's persistent compilation cache for
  every executable (no minimum compile time), so that a second start compiles nothing;
  it leaves it off, with a warning, when oneDNN calls would make every write fail.

``CRCKD_XLA_OPTIONS``: unset or ``default`` (the choice above), ``none`` (add nothing: XLA's
defaults, for baselines) or ``onednn``.
"""

from __future__ import annotations

import importlib.util
import logging
import os

ONEDNN_FLAG = "xla_cpu_experimental_onednn_custom_call"

# Flag name -> value, as written in XLA_FLAGS, per CRCKD_XLA_OPTIONS choice and platform.
CPU_FLAGS: dict[str, dict[str, str]] = {
    "default": {},
    "none": {},
    "onednn": {
        ONEDNN_FLAG: "true",
        "xla_cpu_experimental_ynn_fusion_type": "reduce",
    },
}
GPU_FLAGS: dict[str, str] = {}  # cuDNN and cuBLAS are autotuned by XLA; nothing needed

# The same choices in the form `compiler_options` expects (enum values by their proto name).
_CPU_OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "none": {},
    "onednn": {
        ONEDNN_FLAG: True,
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    },
}

# Accelerator plugins of JAX (module names) and a device file that shows their hardware.
_PLUGINS = (
    ("gpu", ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13",
             "jax_plugins.xla_cuda12"), ("/dev/nvidiactl", "/dev/nvidia0")),
    ("gpu", ("jax_rocm7_plugin", "jax_rocm60_plugin", "jax_plugins.xla_rocm7",
             "jax_plugins.xla_rocm60"), ("/dev/kfd",)),
    ("tpu", ("libtpu",), ("/dev/accel0", "/dev/vfio/0")),
)

log = logging.getLogger(__name__)


def choice(environ=None) -> str:
    """The ``CRCKD_XLA_OPTIONS`` choice: 'default', 'none' or 'onednn'."""
    environ = os.environ if environ is None else environ
    value = environ.get("CRCKD_XLA_OPTIONS", "").strip().lower() or "default"
    if value not in CPU_FLAGS:
        raise ValueError(f"CRCKD_XLA_OPTIONS={value!r}: expected one of {sorted(CPU_FLAGS)}")
    return value


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def expected_backend(environ=None) -> str:
    """'cpu', 'gpu' or 'tpu': the backend JAX will pick by default, found without starting
    JAX (XLA reads ``XLA_FLAGS`` once, when its first backend starts).

    ``JAX_PLATFORMS`` (its first entry) decides when set; otherwise an accelerator is
    expected when one of JAX's accelerator plugins is installed and its device file exists.
    A wrong guess costs speed, never correctness: the flags are ``xla_cpu_*`` flags, which
    only the CPU compiler reads, and the model picks its layers from the backend JAX really
    uses (`crckd_jax.models.kernels`).
    """
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "") or environ.get("JAX_PLATFORM_NAME", "")
    first = platforms.split(",")[0].strip().lower()
    if first:
        if first == "cpu":
            return "cpu"
        return "tpu" if first == "tpu" else "gpu"  # cuda, rocm, gpu
    for backend, modules, devices in _PLUGINS:
        if any(os.path.exists(d) for d in devices) and any(_module_exists(m) for m in modules):
            return backend
    return "cpu"


def xla_flags(platform: str = "cpu", environ=None) -> list[str]:
    """The flags of `platform` ('cpu', 'gpu' or 'tpu') as ``--name=value`` strings."""
    flags = CPU_FLAGS[choice(environ)] if platform == "cpu" else GPU_FLAGS
    return [f"--{name}={value}" for name, value in flags.items()]


def configure(platforms: tuple[str, ...] | None = None, environ=None) -> str:
    """Appends the flags of `platforms` (default: the `expected_backend`) to ``XLA_FLAGS``,
    unless a flag of the same name is there already.

    Call before JAX initialises its backends. Returns the resulting ``XLA_FLAGS`` value.
    ``CRCKD_XLA_OPTIONS`` selects the flags (module docstring); 'none' adds nothing.
    """
    environ = os.environ if environ is None else environ
    if platforms is None:
        platforms = (expected_backend(environ),)
    current = environ.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0].lstrip("-") for f in current.split()}
    added = [f for p in platforms for f in xla_flags(p, environ)
             if f.split("=", 1)[0].lstrip("-") not in present]
    value = " ".join([current, *added]).strip()
    if value or "XLA_FLAGS" in environ:
        environ["XLA_FLAGS"] = value
    return value


def compiler_options(platform: str | None = None, environ=None) -> dict[str, object]:
    """Per-executable compiler options for `platform` (default: JAX's default backend)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return dict(_CPU_OPTIONS[choice(environ)]) if platform == "cpu" else {}


def onednn_calls_enabled(environ=None) -> bool:
    """Whether ``XLA_FLAGS`` sends CPU convolutions and dots to oneDNN custom calls (whose
    executables XLA cannot serialise)."""
    environ = os.environ if environ is None else environ
    for flag in environ.get("XLA_FLAGS", "").split():
        name, _, value = flag.lstrip("-").partition("=")
        if name == ONEDNN_FLAG:
            return value.strip().lower() in ("true", "1", "")
    return False


def default_cache_dir(environ=None) -> str:
    """``$JAX_COMPILATION_CACHE_DIR`` (JAX's own setting) when set, else
    ``$XDG_CACHE_HOME`` or ``~/.cache``, then ``crckd_jax/xla``."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "crckd_jax", "xla")


def enable_compilation_cache(directory: str = "", environ=None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` ('' = `default_cache_dir`)
    for every executable, however short its compilation, so that a start with a warm cache
    compiles nothing.

    Returns the directory, or None when the cache is left off: on the CPU backend with
    oneDNN custom calls in ``XLA_FLAGS`` (``CRCKD_XLA_OPTIONS=onednn``), where XLA fails to
    serialise every executable holding one (a warning per executable otherwise).
    """
    import jax

    if jax.default_backend() == "cpu" and onednn_calls_enabled(environ):
        log.warning("persistent compilation cache off: XLA cannot serialise CPU executables "
                    "with oneDNN calls (%s=true in XLA_FLAGS, CRCKD_XLA_OPTIONS=onednn)",
                    ONEDNN_FLAG)
        return None
    directory = directory or default_cache_dir(environ)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
