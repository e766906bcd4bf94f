"""Loss weights over epochs for the two presets and the ablation ladder."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_config, run_settings
from crckd_jax import protocols
from crckd_jax.losses import sigmoid_rampup
from crckd_jax.objective import LossConfig, loss_weights
from crckd_jax.settings import LOSS_PRESETS, Settings


def weights(config, epoch):
    return {k: float(v) for k, v in loss_weights(config, epoch).items()}


def test_reference_preset_applies_ccd_weight_twice_after_begin_epoch():
    cfg = LossConfig.from_settings(run_settings(loss={"preset": "reference"}).loss)
    early = weights(cfg, 19)
    assert early == {"ce": 1.0, "mt": 0.0, "ccd": pytest.approx(0.1), "crp": 0.0}
    late = weights(cfg, 20)
    assert late["ccd"] == pytest.approx(0.01) and late["crp"] == 1.0
    assert late["mt"] == pytest.approx(float(sigmoid_rampup(20, 30)))
    assert weights(cfg, 45)["mt"] == pytest.approx(1.0)


def test_paper_preset_applies_each_weight_once_from_the_start():
    cfg = LossConfig.from_settings(run_settings(loss={"preset": "paper"}).loss)
    w0 = weights(cfg, 0)
    assert w0["ccd"] == pytest.approx(0.1) and w0["crp"] == 1.0
    assert w0["mt"] == pytest.approx(np.exp(-5.0))
    assert weights(cfg, 30)["ccd"] == pytest.approx(0.1)


@pytest.mark.parametrize("ablation, active", [
    ("baseline", {"ce"}), ("mt", {"ce", "mt"}), ("mt_ccd", {"ce", "mt", "ccd"}),
    ("crckd", {"ce", "mt", "ccd", "crp"})])
@pytest.mark.parametrize("preset", LOSS_PRESETS)
def test_ablation_ladder(ablation, active, preset):
    """The configs' ablations (`protocols.apply_ablation`) switch terms off in both presets."""
    config = run_config(loss={"preset": preset})
    protocols.apply_ablation(config, ablation)
    w = weights(LossConfig.from_settings(Settings.from_dict(config.to_dict()).loss), 40)
    assert {k for k, v in w.items() if v > 0} == active


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="loss.preset must be one of"):
        LossConfig.from_settings(run_settings(loss={"preset": "papers"}).loss)


def test_epoch_of_step_is_the_epoch_the_step_runs_in():
    from crckd_jax.objective import epoch_of_step

    # 3 steps per epoch: steps 1-3 run in epoch 0, 4-6 in epoch 1; the step's own view
    # (the state's count before the step + 1) agrees on traced integers.
    assert [epoch_of_step(s, 3) for s in range(1, 8)] == [0, 0, 0, 1, 1, 1, 2]
    counts = jnp.arange(7, dtype=jnp.int32)  # state.step before steps 1..7
    np.testing.assert_array_equal(epoch_of_step(counts + 1, 3), [0, 0, 0, 1, 1, 1, 2])
