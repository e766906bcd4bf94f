"""XLA options per backend and the persistent compilation cache."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from crckd_jax import xla_options

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONEDNN = "--xla_cpu_experimental_onednn_custom_call=true"


def test_default_choice_adds_no_flags_and_onednn_adds_the_cpu_pair():
    env = {"JAX_PLATFORMS": "cpu"}
    assert xla_options.configure(environ=env) == "" and "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cpu", "CRCKD_XLA_OPTIONS": "onednn"}
    assert xla_options.configure(environ=env).split() == [
        ONEDNN, "--xla_cpu_experimental_ynn_fusion_type=reduce"]
    assert xla_options.compiler_options("cpu", environ=env) == {
        "xla_cpu_experimental_onednn_custom_call": True,
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert xla_options.compiler_options("cpu", environ={}) == {}


def test_cpu_flags_only_for_the_cpu_backend():
    for platforms, expected in (("cuda", ""), ("gpu,cpu", ""), ("tpu", ""),
                                ("cpu", ONEDNN)):
        env = {"JAX_PLATFORMS": platforms, "CRCKD_XLA_OPTIONS": "onednn"}
        assert xla_options.configure(environ=env).split()[:1] == expected.split()[:1]
    assert xla_options.compiler_options("gpu", environ={"CRCKD_XLA_OPTIONS": "onednn"}) == {}


def test_expected_backend_needs_plugin_and_device(monkeypatch):
    monkeypatch.setattr(xla_options, "_module_exists", lambda m: m == "jax_cuda13_plugin")
    monkeypatch.setattr(xla_options.os.path, "exists", lambda p: p == "/dev/nvidiactl")
    assert xla_options.expected_backend({}) == "gpu"
    assert xla_options.expected_backend({"JAX_PLATFORMS": "cpu"}) == "cpu"
    monkeypatch.setattr(xla_options.os.path, "exists", lambda p: False)  # plugin, no GPU
    assert xla_options.expected_backend({}) == "cpu"


def test_users_flags_win_and_none_adds_nothing():
    env = {"JAX_PLATFORMS": "cpu", "CRCKD_XLA_OPTIONS": "onednn",
           "XLA_FLAGS": "--xla_cpu_experimental_onednn_custom_call=false"}
    assert xla_options.configure(environ=env) == (
        "--xla_cpu_experimental_onednn_custom_call=false "
        "--xla_cpu_experimental_ynn_fusion_type=reduce")
    assert not xla_options.onednn_calls_enabled(env)
    env = {"JAX_PLATFORMS": "cpu", "CRCKD_XLA_OPTIONS": "none", "XLA_FLAGS": "--a=1"}
    assert xla_options.configure(environ=env) == "--a=1"
    with pytest.raises(ValueError, match="CRCKD_XLA_OPTIONS"):
        xla_options.configure(environ={"CRCKD_XLA_OPTIONS": "fast"})


# A DenseNet layer's forward and backward (convolutions, dots, reductions) compiled with the
# project's options and the cache on; prints what the cache did.
_CACHE_SCRIPT = """
import json, sys, warnings
from crckd_jax import xla_options
xla_options.configure()
import jax, jax.numpy as jnp
from jax import monitoring
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
directory = xla_options.enable_compilation_cache(sys.argv[1])
from crckd_jax.models.batch_norm import BatchNormSettings
from crckd_jax.models.densenet import _DenseLayer
layer = _DenseLayer(4, 2, jnp.float32, BatchNormSettings())
x = jnp.ones((2, 8, 8, 6))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    v = jax.jit(lambda k: layer.init(k, x, None, True))(jax.random.key(0))
    loss = lambda p: layer.apply({**v, "params": p}, x, None, True, mutable=["batch_stats"])[0].sum()
    jax.block_until_ready(jax.jit(jax.grad(loss))(v["params"]))
print(json.dumps({"directory": directory,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"),
                  "write_errors": [str(w.message) for w in caught
                                   if "persistent compilation cache" in str(w.message)]}))
"""


def _run_cache_script(cache, **env):
    proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(cache)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
                               "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_cache_dir_follows_jax_then_xdg():
    assert xla_options.default_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/c/jax",
                                          "XDG_CACHE_HOME": "/c/xdg"}) == "/c/jax"
    assert xla_options.default_cache_dir({"XDG_CACHE_HOME": "/c/xdg"}) == "/c/xdg/crckd_jax/xla"
    assert xla_options.default_cache_dir({}) == os.path.expanduser("~/.cache/crckd_jax/xla")


def test_compilation_cache_is_written_and_a_second_start_compiles_nothing(tmp_path):
    cold = _run_cache_script(tmp_path / "cache")
    assert cold["write_errors"] == [] and cold["misses"] >= 2 and cold["hits"] == 0
    assert len(list((tmp_path / "cache").glob("*-cache"))) >= 2
    warm = _run_cache_script(tmp_path / "cache")
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"]


def test_compilation_cache_stays_off_with_onednn_calls(tmp_path):
    """XLA cannot serialise executables with oneDNN calls: the cache is not turned on
    (instead of failing to write every entry)."""
    result = _run_cache_script(tmp_path / "cache", CRCKD_XLA_OPTIONS="onednn")
    assert result["directory"] is None and result["write_errors"] == []
    assert not (tmp_path / "cache").exists()
