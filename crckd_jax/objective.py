"""How the four CRCKD terms are weighted over training: the one place that decides it.

Terms (the paper's names): CE = class-weighted cross-entropy; MT = the mean-teacher
consistency; CCD = class-guided contrastive distillation (NCE, student + teacher side);
CRP = categorical relation preserving. Presets:

* `reference`: what the authors' training script executes. Before `begin_epoch` (20):
  CE + w_ccd * CCD. From then on: CE + lambda(epoch) * MT + w_ccd^2 * CCD + w_crp * CRP,
  because the script rescales the CCD loss by its weight and multiplies it by the weight
  again when forming the total; MT and CRP are off before `begin_epoch`.
* `paper`: each weight applied once from the first epoch:
  CE + lambda(epoch) * MT + w_ccd * CCD + w_crp * CRP.

lambda(epoch) = consistency * sigmoid_rampup(epoch, rampup_epochs), indexed by epoch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from crckd_jax.losses import sigmoid_rampup

TERMS = ("ce", "mt", "ccd", "crp")  # the loss terms, in the order they are reported
LOSS_KEYS = ("loss", *TERMS)  # the total and its terms, as the step reports them
PRESETS = ("reference", "paper")
ABLATIONS = ("baseline", "mt", "mt_ccd", "crckd")


class LossConfig(NamedTuple):
    """Weights of the objective (static). See `loss_weights` for how they combine."""

    ce_weight: float = 1.0
    consistency: float = 1.0  # MT weight after ramp-up
    rampup_epochs: float = 30.0  # sigmoid ramp-up length of the MT weight, in epochs
    ccd_weight: float = 0.1  # CCD weight before begin_epoch
    ccd_weight_late: float = 0.01  # CCD weight from begin_epoch on
    crp_weight: float = 1.0  # CRP weight from begin_epoch on
    begin_epoch: int = 20  # epoch at which MT and CRP start

    @classmethod
    def from_preset(cls, preset: str, *, ablation: str = "crckd", ccd_weight: float = 0.1,
                    crp_weight: float = 1.0, consistency: float = 1.0,
                    rampup_epochs: float = 30.0, begin_epoch: int = 20,
                    ce_weight: float = 1.0) -> "LossConfig":
        """`preset` in PRESETS; `ablation` in ABLATIONS switches terms off (baseline = CE
        only, mt = CE + MT, mt_ccd = CE + MT + CCD, crckd = all four)."""
        if preset not in PRESETS:
            raise ValueError(f"loss.preset must be one of {PRESETS}, got {preset!r}")
        if ablation not in ABLATIONS:
            raise ValueError(f"loss ablation must be one of {ABLATIONS}, got {ablation!r}")
        use_mt = ablation != "baseline"
        use_ccd = ablation in ("mt_ccd", "crckd")
        use_crp = ablation == "crckd"
        reference = preset == "reference"
        ccd = ccd_weight if use_ccd else 0.0
        return cls(
            ce_weight=ce_weight,
            consistency=consistency if use_mt else 0.0,
            rampup_epochs=rampup_epochs,
            ccd_weight=ccd,
            ccd_weight_late=ccd * ccd if reference else ccd,
            crp_weight=crp_weight if use_crp else 0.0,
            begin_epoch=begin_epoch if reference else 0,
        )


def loss_weights(config: LossConfig, epoch: jax.Array) -> dict[str, jax.Array]:
    """Weights of CE, MT, CCD and CRP at `epoch` (int scalar): float32 scalars."""
    late = jnp.asarray(epoch) >= config.begin_epoch
    ramp = config.consistency * sigmoid_rampup(epoch, config.rampup_epochs)
    return {
        "ce": jnp.float32(config.ce_weight),
        "mt": jnp.where(late, ramp, 0.0).astype(jnp.float32),
        "ccd": jnp.where(late, config.ccd_weight_late, config.ccd_weight).astype(jnp.float32),
        "crp": jnp.where(late, config.crp_weight, 0.0).astype(jnp.float32),
    }
