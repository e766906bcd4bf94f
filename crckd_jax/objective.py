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
from crckd_jax.settings import LOSS_PRESETS, LossSettings

TERMS = ("ce", "mt", "ccd", "crp")  # the loss terms, in the order they are reported
LOSS_KEYS = ("loss", *TERMS)  # the total and its terms, as the step reports them


class LossConfig(NamedTuple):
    """Weights of the objective (static), from the `loss` settings (`from_settings`).
    CE always has weight 1; see `loss_weights` for how the others combine."""

    consistency: float  # MT weight after ramp-up
    rampup_epochs: float  # sigmoid ramp-up length of the MT weight, in epochs
    ccd_weight: float  # CCD weight before begin_epoch
    ccd_weight_late: float  # CCD weight from begin_epoch on
    crp_weight: float  # CRP weight from begin_epoch on
    begin_epoch: int  # epoch at which MT and CRP start

    @classmethod
    def from_settings(cls, loss: LossSettings) -> "LossConfig":
        """The weights of `loss`: its preset (LOSS_PRESETS) schedules its weights; an
        ablation is weights set to 0 (`protocols.apply_ablation`)."""
        if loss.preset not in LOSS_PRESETS:
            raise ValueError(f"loss.preset must be one of {LOSS_PRESETS}, got {loss.preset!r}")
        reference = loss.preset == "reference"
        return cls(
            consistency=loss.consistency,
            rampup_epochs=loss.rampup_epochs,
            ccd_weight=loss.ccd_weight,
            ccd_weight_late=loss.ccd_weight * loss.ccd_weight if reference else loss.ccd_weight,
            crp_weight=loss.crp_weight,
            begin_epoch=loss.begin_epoch if reference else 0,
        )


def epoch_of_step(step, steps_per_epoch: int):
    """The 0-based epoch of optimizer step number `step` (1-based: the step that brings the
    state's step count to `step`); a Python int or a traced integer array."""
    return (step - 1) // steps_per_epoch


def loss_weights(config: LossConfig, epoch: jax.Array) -> dict[str, jax.Array]:
    """Weights of CE, MT, CCD and CRP at `epoch` (int scalar): float32 scalars."""
    late = jnp.asarray(epoch) >= config.begin_epoch
    ramp = config.consistency * sigmoid_rampup(epoch, config.rampup_epochs)
    return {
        "ce": jnp.float32(1.0),
        "mt": jnp.where(late, ramp, 0.0).astype(jnp.float32),
        "ccd": jnp.where(late, config.ccd_weight_late, config.ccd_weight).astype(jnp.float32),
        "crp": jnp.where(late, config.crp_weight, 0.0).astype(jnp.float32),
    }
