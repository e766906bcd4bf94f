"""Parity of crckd_jax.optim with torch Adam(weight_decay) + OneCycleLR.

Fixture ``optimizer_onecycle.npz`` (written with torch): ``p0`` [n]; per step t the
gradient is ``grad_a[t] * p_t + grad_c[t]`` (p_t = params before step t), ``grads``
[T, n] are those gradients as torch computed them, ``lr``/``beta1`` [T] (float64)
are in effect at step t and ``params`` [T, n] are the parameters after step t.
All hyper-parameters are read from the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crckd_jax.optim import current_learning_rate, make_optimizer, onecycle_schedules
from tools.parity import optimizer_trajectory, recompute

FIXTURE = Path(__file__).parent / "fixtures" / "optimizer_onecycle.npz"
F32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _total_steps(d) -> int:
    return int(d["epochs"]) * int(d["steps_per_epoch"])


def _schedule_kwargs(d) -> dict[str, float]:
    return {
        k: float(d[k])
        for k in (
            "pct_start",
            "div_factor",
            "final_div_factor",
            "base_momentum",
            "max_momentum",
        )
    }


def _optimizer(d) -> optax.GradientTransformation:
    return make_optimizer(
        _total_steps(d),
        max_lr=float(d["max_lr"]),
        weight_decay=float(d["weight_decay"]),
        b2=float(d["beta2"]),
        eps=float(d["adam_eps"]),
        **_schedule_kwargs(d),
    )


def _run_trajectory(d) -> dict[str, np.ndarray]:
    """Run the T optimizer steps of the fixture with ``lax.scan``."""
    return optimizer_trajectory(d)


def _torch_onecycle(t, total, start, peak, end, pct_start):
    """torch OneCycleLR._get_lr for one step (two phases, cos), in float64."""
    phases = [(float(pct_start * total) - 1, start, peak), (total - 1, peak, end)]
    lo = 0.0
    for i, (hi, a, b) in enumerate(phases):
        if t <= hi or i == len(phases) - 1:
            pct = (t - lo) / (hi - lo)
            return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
        lo = hi
    raise AssertionError


def test_schedules_match_torch(ref):
    d = ref
    total = _total_steps(d)
    assert d["lr"].shape == (total,)
    lr_s, b1_s = onecycle_schedules(total, float(d["max_lr"]), **_schedule_kwargs(d))
    steps = jnp.arange(total)
    lr = np.asarray(jax.vmap(lr_s)(steps), np.float64)
    b1 = np.asarray(jax.vmap(b1_s)(steps), np.float64)
    # float32 evaluation vs float64 reference: rounding the result to float32 alone is
    # 0.5 ulp (6e-8 relative); sin/products add a few ulp. Measured max relative error
    # 3.0e-7 (lr) and 2.1e-7 (beta1), i.e. <= 3 ulp. The lr spans 5 decades
    # (1.2e-5 .. 3e-4 .. 1.2e-9), so only a relative bound is meaningful. (Evaluating
    # torch's 1 + cos(pi*pct) form directly in float32 gives 3e-5 near the end.)
    np.testing.assert_allclose(lr, d["lr"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(b1, d["beta1"], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "total, pct_start",
    [(33, 0.3), (7, 0.1), (10, 0.25), (5, 1.0), (1, 0.3), (80 * 92, 0.3)],
)
def test_schedules_match_torch_formula_other_lengths(total, pct_start):
    # Non-integer phase boundary (33*0.3 - 1 = 8.9), no warm-up step at all
    # (7*0.1 - 1 < 0), pct_start = 1, a single step, and a realistic run length.
    max_lr, div, fdiv, mom_lo, mom_hi = 3e-4, 25.0, 1e4, 0.85, 0.95
    lr_s, b1_s = onecycle_schedules(
        total, max_lr, pct_start, div, fdiv, base_momentum=mom_lo, max_momentum=mom_hi
    )
    steps = np.arange(total)
    lr = np.asarray(jax.vmap(lr_s)(jnp.asarray(steps)), np.float64)
    b1 = np.asarray(jax.vmap(b1_s)(jnp.asarray(steps)), np.float64)
    init = max_lr / div
    want_lr = [_torch_onecycle(t, total, init, max_lr, init / fdiv, pct_start) for t in steps]
    want_b1 = [_torch_onecycle(t, total, mom_hi, mom_lo, mom_hi, pct_start) for t in steps]
    np.testing.assert_allclose(lr, want_lr, rtol=1e-6, atol=0)
    np.testing.assert_allclose(b1, want_b1, rtol=1e-6, atol=0)


def test_schedule_rejects_empty_warmup():
    # torch divides by zero at step 0 when pct_start * total_steps == 1.
    with pytest.raises(ValueError):
        onecycle_schedules(10, 3e-4, pct_start=0.1)
    with pytest.raises(ValueError):
        onecycle_schedules(0, 3e-4)


def test_schedule_holds_final_value_after_total_steps(ref):
    total = _total_steps(ref)
    lr_s, b1_s = onecycle_schedules(total, float(ref["max_lr"]), **_schedule_kwargs(ref))
    assert float(lr_s(total + 5)) == float(lr_s(total - 1))
    assert float(b1_s(total + 5)) == float(b1_s(total - 1))


def test_fixture_gradients_follow_documented_formula(ref):
    # Exact in numpy float32 (separate multiply and add, as torch did).
    p_before = np.concatenate([ref["p0"][None], ref["params"][:-1]])
    np.testing.assert_array_equal(ref["grad_a"] * p_before + ref["grad_c"], ref["grads"])


def test_trajectory_matches_torch(ref):
    d = ref
    out = _run_trajectory(d)
    total = _total_steps(d)
    assert int(out["count"]) == total

    # Gradients recomputed inside the scan from our own trajectory. XLA:CPU may fuse
    # a*p + c into one FMA (one rounding instead of two), so allow 2 ulp of
    # |a*p| + |c|; measured max abs error 4.8e-7 (with |a*p| + |c| up to ~5).
    p_before = np.concatenate([d["p0"][None], out["params"][:-1]])
    scale = np.abs(d["grad_a"] * p_before) + np.abs(d["grad_c"])
    assert np.all(np.abs(out["grads"] - d["grads"]) <= 2 * F32_EPS * scale)

    # Whole parameter trajectory. Per step the two sides differ only by float32
    # rounding (FMA in the gradient, sqrt(v/bc2) vs sqrt(v)/sqrt(bc2), float32 vs
    # float64 bias corrections and schedules), each ~1e-7 relative to an update of
    # size <= lr; measured max error over all T steps: 3.7e-9 absolute, 8.9e-8
    # relative (|p| >= 0.04 here). rtol 1e-5 leaves room for other fixtures; the
    # small atol covers parameters that pass near zero.
    np.testing.assert_allclose(out["params"], d["params"], rtol=1e-5, atol=1e-7)

    # current_learning_rate(state after update t) is the lr that update t used.
    np.testing.assert_allclose(out["lr_applied"], d["lr"], rtol=1e-6, atol=0)


def test_weight_decay_is_coupled_l2_on_all_params():
    # At the first step Adam's bias-corrected update is -lr * g / (|g| + eps) whatever
    # beta1 is. With a zero loss gradient, coupled L2 makes g = wd * p, so every
    # parameter (no exclusions) moves by -lr * sign(p); AdamW would give -lr*wd*p.
    opt = make_optimizer(10, max_lr=1.0, weight_decay=0.5, pct_start=0.5)
    params = {"w": jnp.array([3.0, -4.0]), "b": jnp.array([1.0])}
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = opt.update(zeros, state, params)
    lr0 = float(current_learning_rate(state))
    assert lr0 == pytest.approx(1.0 / 25.0, rel=1e-6)
    np.testing.assert_allclose(updates["w"], [-lr0, lr0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-lr0], rtol=1e-6)


def test_epoch_end_lr_reset_matches_torch():
    """`reset_lr_every` = steps per epoch reproduces the reference's epoch-end
    `param_group['lr'] = base_lr` between torch OneCycleLR steps (fixture
    onecycle_reset.npz, tests/fixtures/make_onecycle_reset_fixture.py): the first update of
    every later epoch runs at base_lr, every other update and every beta1 as scheduled, and
    the parameters follow torch's. Tolerances as in test_trajectory_matches_torch."""
    with np.load(FIXTURE.with_name("onecycle_reset.npz")) as f:
        d = {k: f[k] for k in f.files}
    steps = int(d["steps_per_epoch"])
    total = int(d["epochs"]) * steps
    ours = recompute(d)  # the parity kind `optimizer_reset`: make_optimizer on d["grads"]
    resets = [t for t in range(total) if t and t % steps == 0]
    np.testing.assert_allclose(ours["lr"][resets], d["base_lr"], rtol=1e-6)
    np.testing.assert_allclose(ours["lr"], d["lr"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours["beta1"], d["beta1"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours["params"], d["params"], rtol=1e-5, atol=1e-7)
    # Without the reset the same updates differ exactly there.
    plain, _ = onecycle_schedules(total, float(d["max_lr"]))
    assert all(abs(float(plain(t)) - d["lr"][t]) > 1e-6 for t in resets)
