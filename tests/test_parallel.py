"""Data parallelism: N fake CPU devices equal one device with the same global batch; pmap
equals shard_map; the state layouts of both backends; bfloat16 compute.

Each multi-device case runs `tests/multidevice/equivalence.py` in a fresh interpreter,
because the number of fake devices (XLA_FLAGS) is fixed when JAX starts. BatchNorm
statistics are synchronised across devices there, which is what makes N devices equal one,
or computed in fixed groups of items (model.bn_group_size), which gives the same groups on
one device or several.

Tolerances (max |a - b| over a leaf / max |b|, worst leaf), 1 vs N devices: the loss agrees
to float32 rounding (rtol 1e-5; measured 2e-7 with 4 devices). Parameters after three Adam
steps agree to 1e-3 of max(max |b|, 1e-2): Adam divides by sqrt(v), so at the first steps an
update is lr * g / (|g| + eps), and a gradient component that nearly cancels (the sum over
devices is taken in another order than the single-device sum) moves its entry by a rounding-
dependent fraction of lr; a leaf grown from 0 (a BatchNorm bias, ~1e-3 after three steps)
holds such entries, hence the floor. Measured on a 2-core AMD EPYC (Zen 4): 2.2e-4 (bank, 4
devices: one entry of `norm0`'s bias, 2.2e-6 apart), 1.7e-6 (queue). The memory rows (unit
vectors) and BN statistics: 1e-4 (measured 3e-6 and 4e-7).

pmap vs shard_map (4 devices, 3 steps): the losses and the class memory are bit-identical;
parameters differ by ~1e-8 and BatchNorm running statistics by one float32 ulp (~1e-7) in a
few entries. Both backends sum over devices in the same order (a psum of the same values is
bit-identical under both), and the compiled programs are the same except that pmap's
per-device program carries each state leaf with its stacked axis ([1, C] instead of [C]):
XLA's CPU code generation then rounds a few elementwise updates (running-statistics
momentum, optimizer update) differently. Asserted: losses and memory identical, the rest
within 1e-6.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from crckd_jax.parallel import DataParallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "multidevice" / "equivalence.py"


def run_equivalence(num_devices, kind, backends, forms="both"):
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    out = subprocess.run([sys.executable, str(SCRIPT), str(num_devices), kind,
                          ",".join(backends), forms], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(report, backends):
    for backend in backends:
        r = report[backend]
        assert r["memory_identical_on_devices"], backend
        assert r["loss"] < 1e-5, r
        assert r["params"] < 1e-3 and r["ema_params"] < 1e-3, r
        assert r["memory"] < 1e-4 and r["batch_stats"] < 1e-4, r


@pytest.mark.parametrize("forms", ["uint8", pytest.param("both", marks=pytest.mark.slow)])
def test_four_devices_queue_shard_map_and_pmap(forms):
    """The default data path (uint8 images augmented in the step); with `both` (slow) also
    steps on views made on the host."""
    report = run_equivalence(4, "queue", ["shard_map", "pmap"], forms)
    check(report, ["shard_map", "pmap"])
    assert report["pmap_vs_shard_map_losses_identical"], report
    parts = report["pmap_vs_shard_map_parts"]
    assert parts["memory"]["identical"], parts
    assert report["pmap_vs_shard_map"] < 1e-6, parts


@pytest.mark.slow
def test_batchnorm_groups_do_not_depend_on_the_device_split():
    """model.bn_group_size: one device with the batch in 2 BatchNorm groups equals 2 devices
    with one group each (shard_map and pmap), running statistics included (the first
    group's: the reference's first GPU)."""
    report = run_equivalence(2, "queue-groups", ["shard_map", "pmap"])
    check(report, ["shard_map", "pmap"])


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [4, 8])
def test_bank_memory_shard_map(num_devices):
    check(run_equivalence(num_devices, "bank", ["shard_map"]), ["shard_map"])


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_state_layouts_round_trip(backend):
    dp = DataParallel(backend, jax.devices()[:1])
    host = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(4)}
    placed = dp.put_state(host)
    if backend == "pmap":
        assert placed["w"].shape == (1, 2, 3)  # one copy per local device
    one = dp.get_state(placed)  # replicated global arrays: what checkpoints hold
    assert one["w"].shape == (2, 3) and one["w"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(one["w"]), host["w"])
    again = dp.put_state(one)
    np.testing.assert_array_equal(np.asarray(dp.get_state(again)["step"]), 4)
    abstract = dp.abstract_state(host)
    assert abstract["w"].shape == (2, 3) and abstract["w"].sharding == dp.replicated
    # A compiled step donates the state it is given; the arrays it was put from live on.
    on_device = jax.tree.map(jax.numpy.asarray, host)
    donating = dp.compile(lambda state, batch: (state, {}), donate_state=True)
    donating(dp.put_state(on_device), dp.put_batch({"x": np.zeros((1, 1), np.float32)}))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(on_device))
    np.testing.assert_array_equal(np.asarray(on_device["w"]), host["w"])


def _primitive_dtypes(jaxpr, found):
    """(primitive name, input dtypes) of every equation, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name,
                      tuple(str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitive_dtypes(inner, found)
    return found


def _equivalence_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import equivalence
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return equivalence


def _float_dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)}


def test_bfloat16_computes_in_bfloat16_with_float32_state_and_losses():
    import jax.numpy as jnp

    from crckd_jax.models.densenet import CRCKDNet, densenet_config

    equivalence = _equivalence_module()
    state, step = equivalence.setup("queue", None, dtype=jnp.bfloat16)
    batch = next(equivalence.batches())
    traced = jax.make_jaxpr(step, return_shape=True)(state, batch)
    closed, (new_state, metrics) = traced
    ops = _primitive_dtypes(closed.jaxpr, [])
    heavy = [d for name, d in ops if name in ("conv_general_dilated", "dot_general")]
    bf16 = [d for d in heavy if d and all(x == "bfloat16" for x in d)]
    # The backbone's convolutions run in bfloat16 (forward and backward); the head, the
    # projections, the memory scores and the losses in float32.
    assert len(bf16) >= len(heavy) // 2 > 0, heavy
    # After a step: parameters, optimizer state, EMA, BatchNorm statistics, memory and Z
    # are float32, and so are the losses.
    assert _float_dtypes(new_state) == {"float32"}
    assert _float_dtypes(metrics) == {"float32"}
    # The same float32 parameters give float32 outputs close to the float32 network's.
    variables = {"params": state.params["student"], "batch_stats": state.batch_stats}
    outs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = CRCKDNet(densenet_config("densenet_tiny"), equivalence.NUM_CLASSES,
                         hidden_dim=32, dtype=dtype)
        outs[dtype] = jax.jit(lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"]))(variables, batch["image_student"])
        assert _float_dtypes(outs[dtype]) == {"float32"}
    for key in ("pooled", "feature", "logits"):
        a, b = np.asarray(outs[jnp.bfloat16][0][key]), np.asarray(outs[jnp.float32][0][key])
        assert np.max(np.abs(a - b)) <= 5e-2 * np.max(np.abs(b)), key


@pytest.mark.slow
def test_bfloat16_training_steps_are_finite_and_close_to_float32():
    import jax.numpy as jnp

    equivalence = _equivalence_module()
    losses_seen = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        state, step = equivalence.setup("queue", None, dtype=dtype)
        step = jax.jit(step)
        losses_seen[dtype] = []
        for b in equivalence.batches():
            state, metrics = step(state, b)
            losses_seen[dtype].append(float(metrics["loss"]))
        assert _float_dtypes(state) == {"float32"}
    assert np.all(np.isfinite(losses_seen[jnp.bfloat16]))
    # Measured: within 1.2% over three steps.
    np.testing.assert_allclose(losses_seen[jnp.bfloat16], losses_seen[jnp.float32], rtol=5e-2)
