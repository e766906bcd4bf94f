"""The CRCKD train step and eval step: pure functions, written once per device.

`train_step(state, batch, class_weight) -> (state, metrics)` runs the student forward
and backward, the teacher forward, memory sampling, scoring and update, the four losses,
the optimizer and the EMA. With `axis_name` set, it uses named-axis collectives so the
same code runs under `shard_map` or `pmap`: every loss term is computed as this device's
contribution to the loss of the GLOBAL batch (so gradients are summed with `psum`), Z and
the class weights' denominator come from all devices, and the memory is updated with the
all-gathered batch. With `axis_name=None` the collectives vanish and the step is the
reference computation. The class weights ([C] float32, `losses.class_weights` of the
fold's class counts) are an argument, not a constant, so every fold of a data set runs
the same compiled program.

Batch (per device): image uint8 [B, H, W, 3] (the step makes the student's and the
teacher's augmented views from it, `crckd_jax.augment`), or image_student, image_teacher
float32 [B, H, W, 3] made on the host; label, index int32 [B] (index = the item's position
in the training set); optionally mask bool [B] (a partial batch: False on padding, which
enters no BatchNorm statistics, no loss and no memory row; CE, CCD and CRP average the
unmasked items, MT keeps the configured divisor, as the reference does); optionally
contrast_idx int32 [B, P + K] (row ids into the memory, used as given instead of
`memory.sample_contrast`: a parity check replaying the reference's own indices). Eval
batch: image [B, H, W, 3] (uint8, normalised here, or float32 already normalised), label
[B], mask bool [B].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from crckd_jax import augment, losses, teacher
from crckd_jax.collectives import of_first_device, pmean, psum, psum_flat
from crckd_jax.distillation import ContrastConfig, ccd_crp
from crckd_jax.models.densenet import CRCKDNet
from crckd_jax.models.networks import Networks
from crckd_jax.objective import LossConfig, epoch_of_step, loss_weights
from crckd_jax.settings import TEACHER_BN, Settings
from crckd_jax.state import TrainState


class StepConfig(NamedTuple):
    """Static settings of the train step, from the run's settings (`from_settings`).

    steps_per_epoch: optimizer steps per epoch (the loss schedule is indexed by epoch).
    consistency_divisor: the MT loss divisor, the configured global batch size (reference).
    teacher_bn: 'train' (reference: batch statistics, own running stats) or 'eval'.
    teacher_rotate: random 90-degree rotation + flip of the teacher view, on device.
    running_stats_of_first_device: BatchNorm running statistics of the first device kept
      (the reference's DataParallel), instead of their mean over the devices.
    axis_name: the data-parallel axis, or None on one device.
    """

    loss: LossConfig
    contrast: ContrastConfig
    ema_decay: float
    steps_per_epoch: int
    consistency_divisor: float
    teacher_bn: str
    teacher_rotate: bool
    running_stats_of_first_device: bool
    axis_name: str | None

    @classmethod
    def from_settings(cls, settings: Settings, *, steps_per_epoch: int,
                      axis_name: str | None) -> "StepConfig":
        """The step's part of the run's `settings`; `steps_per_epoch` and `axis_name` are
        facts of the run (the data set's size, the device layout)."""
        return cls(
            loss=LossConfig.from_settings(settings.loss),
            contrast=ContrastConfig.from_settings(settings.memory),
            ema_decay=settings.train.ema_decay,
            steps_per_epoch=steps_per_epoch,
            consistency_divisor=settings.train.batch_size,
            teacher_bn=settings.train.teacher_bn,
            teacher_rotate=settings.train.teacher_rotate,
            running_stats_of_first_device=bool(settings.model.bn_group_size),
            axis_name=axis_name,
        )


def example_keys(rng: jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
    """[B, 4] keys per example (teacher turn, contrast, student view, teacher view), from
    the run key data, the step and the item's index in the training set.

    Keying by the data set index makes every draw independent of the device and process
    count; the step fixes the pass, so an item gets new draws every time it is seen, and a
    resumed run draws what an uninterrupted one would.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(step_key, i), 4))(index)


def _views(batch: dict[str, jax.Array], keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The student's and the teacher's training views, float32 [B, H, W, 3]; keys [B, 2]."""
    if "image" in batch:
        return augment.two_views(keys, batch["image"])
    return batch["image_student"], batch["image_teacher"]


def _teacher_forward(model: CRCKDNet, state, images, config, mask):
    variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    if config.teacher_bn == "train":
        out, updated = model.apply(variables, images, train=True, mask=mask,
                                   mutable=["batch_stats"])
        return jax.lax.stop_gradient(out), updated["batch_stats"]
    if config.teacher_bn == "eval":
        return jax.lax.stop_gradient(model.apply(variables, images, train=False)), \
            state.ema_batch_stats
    raise ValueError(f"teacher_bn must be one of {TEACHER_BN}, got {config.teacher_bn!r}")


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    class_weight: jax.Array,
    *,
    networks: Networks,
    optimizer: optax.GradientTransformation,
    config: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one (per-device) batch; see the module docstring."""
    axis = config.axis_name
    labels, index = batch["label"], batch["index"]
    mask = batch.get("mask")  # a partial batch's padding: False
    keys = example_keys(state.rng, state.step, index)
    images_s, images_t = _views(batch, keys[:, 2:])
    if config.teacher_rotate:
        images_t = jax.vmap(teacher.rotate_flip)(keys[:, 0], images_t)
    out_t, ema_batch_stats = _teacher_forward(networks.network, state, images_t, config, mask)
    if "contrast_idx" in batch:
        contrast_idx = batch["contrast_idx"]
    else:
        contrast_idx = state.memory.sample_contrast(
            keys[:, 1], labels, index, config.contrast.num_positives,
            config.contrast.num_negatives)
    epoch = epoch_of_step(state.step + 1, config.steps_per_epoch)
    weights = loss_weights(config.loss, epoch)
    # ccd_crp's losses are this device's batch means, or with a mask already its share of
    # the global mean
    num_devices = psum(1, axis) if mask is None else 1
    weight_sum = psum(jnp.sum(losses.item_weights(class_weight, labels, mask)), axis)

    def loss_fn(params):
        out_s, updated = networks.network.apply(
            {"params": params["student"], "batch_stats": state.batch_stats},
            images_s, train=True, mask=mask, mutable=["batch_stats"])
        e_s, e_t = networks.embed(params, out_s["feature"], out_t["feature"])
        distill, memory = ccd_crp(e_s, e_t, state.memory, labels, index, contrast_idx,
                                  config.contrast, axis, mask)
        # This device's share of each term of the global batch's loss.
        terms = {
            "ce": losses.weighted_cross_entropy(out_s["logits"], labels, class_weight,
                                                weight_sum, mask),
            "mt": losses.softmax_kl(out_s["logits"], out_t["logits"],
                                    config.consistency_divisor, mask),
            "ccd": distill.loss_ccd / num_devices,
            "crp": distill.loss_crp / num_devices,
        }
        total = sum(weights[k] * terms[k] for k in terms)
        extras = {"ccd_student": distill.loss_s / num_devices,
                  "ccd_teacher": distill.loss_t / num_devices}
        return total, (terms | extras, updated["batch_stats"], memory)

    grads, (terms, batch_stats, memory) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = psum_flat(grads, axis)
    if axis is not None:
        # Per-device BatchNorm statistics (unless the model synchronises them) leave
        # per-device running statistics; their mean (or the first device's) keeps the
        # state replicated.
        combine = of_first_device if config.running_stats_of_first_device else pmean
        batch_stats = combine(batch_stats, axis)
        ema_batch_stats = combine(ema_batch_stats, axis)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = teacher.ema_update(state.ema_params, params["student"], state.step,
                                    config.ema_decay)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, ema_params=ema_params,
        ema_batch_stats=ema_batch_stats, opt_state=opt_state, memory=memory)
    terms = psum(terms, axis)
    metrics = {
        "loss": sum(weights[k] * terms[k] for k in weights),
        **terms,
        **{f"weight_{k}": v for k, v in weights.items()},
        "z_student": memory.z_student,
        "z_teacher": memory.z_teacher,
        "epoch": epoch,
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: CRCKDNet,
              use_teacher: bool = False) -> dict[str, jax.Array]:
    """Probabilities [B, C] and embeddings [B, F] of the student (or teacher), eval mode."""
    params, stats = ((state.ema_params, state.ema_batch_stats) if use_teacher
                     else (state.params["student"], state.batch_stats))
    return classify(model, {"params": params, "batch_stats": stats}, batch["image"])


def classify(model: CRCKDNet, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    """Probabilities [B, C] and embeddings [B, F] of `images` (uint8 [B, H, W, 3], normalised
    here, or float32 already normalised) in eval mode."""
    if images.dtype == jnp.uint8:
        images = augment.normalize(images)
    out = model.apply(variables, images, train=False)
    return {"probs": jax.nn.softmax(out["logits"]), "features": out["feature"]}


def make_train_step(networks: Networks, optimizer, config: StepConfig):
    """The per-device train step with everything static bound:
    (state, batch, class_weight) -> (state, metrics)."""
    return functools.partial(train_step, networks=networks, optimizer=optimizer,
                             config=config)
