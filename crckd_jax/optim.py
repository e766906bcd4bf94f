"""Optimizer of the reference training: torch ``Adam`` (coupled L2) + ``OneCycleLR``.

The reference builds ``torch.optim.Adam(lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
weight_decay=5e-4)`` and ``torch.optim.lr_scheduler.OneCycleLR(max_lr=3e-4,
epochs=E, steps_per_epoch=S)`` with torch defaults, stepping the scheduler once per
iteration after ``optimizer.step()``. The Adam ``lr`` passed to the constructor is
irrelevant: OneCycleLR overwrites it before the first step.

Equivalences with torch (update ``t`` = 0, 1, ..., ``T - 1``):

* learning rate and beta1 of update ``t`` are ``lr_schedule(t)`` and
  ``beta1_schedule(t)`` (torch: ``OneCycleLR`` with ``last_epoch == t``; with
  ``cycle_momentum=True`` torch cycles Adam's beta1 inversely to the lr);
* ``g <- g + weight_decay * p`` before the moments (torch Adam's coupled L2, not
  AdamW), on every parameter (torch's single param group);
* ``m <- beta1_t m + (1 - beta1_t) g``, ``v <- b2 v + (1 - b2) g**2`` and bias
  corrections ``1 - beta1_t**(t+1)``, ``1 - b2**(t+1)`` with the CURRENT beta1, as
  torch does; ``p <- p - lr_t * m_hat / (sqrt(v_hat) + eps)``.

At every epoch end the reference also sets the optimizer's lr back to ``base_lr`` (1e-4);
``OneCycleLR`` overwrites it only after the next ``optimizer.step()``, so the first update
of every later epoch runs at ``base_lr`` (beta1 keeps its schedule). ``reset_lr_every`` =
steps per epoch reproduces that (:func:`with_epoch_resets`).

``optax.cosine_onecycle_schedule`` is not used: it puts the peak at step
``int(pct_start * T)`` and the end at step ``T``, whereas torch peaks at
``float(pct_start * T) - 1`` and ends at ``T - 1``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

__all__ = ["onecycle_schedules", "with_epoch_resets", "make_optimizer",
           "current_learning_rate"]


def _two_phase_cosine(
    total_steps: int, pct_start: float, start: float, peak: float, end: float
) -> optax.Schedule:
    """torch OneCycleLR (two phases, ``anneal_strategy='cos'``) for one quantity.

    Phase 1 goes ``start -> peak`` over steps ``[0, pct_start*T - 1]``, phase 2
    ``peak -> end`` over ``[pct_start*T - 1, T - 1]``; steps past ``T - 1`` hold
    ``end`` (torch raises there).
    """
    # Python float64 boundaries, computed exactly as torch computes them.
    end1 = float(pct_start * total_steps) - 1.0
    end2 = float(total_steps - 1)

    def schedule(count):
        step = jnp.clip(jnp.asarray(count, dtype=float), 0.0, end2)
        in1 = step <= end1
        lo = jnp.where(in1, 0.0, end1)
        hi = jnp.where(in1, end1, end2)
        v_from = jnp.where(in1, start, peak)
        v_to = jnp.where(in1, peak, end)
        span = hi - lo
        # torch: v_to + (v_from - v_to) / 2 * (1 + cos(pi * pct)), pct = (step - lo) / span.
        # Same value written as v_from * sin^2(pi/2 (1 - pct)) + v_to * sin^2(pi/2 pct):
        # both weights are non-negative and come from small sine arguments, so there is
        # no cancellation in float32 near the phase ends (1 + cos(pi*pct) loses ~4
        # digits there), and (hi - step), (step - lo) are exact for integer steps.
        half_pi = 0.5 * math.pi
        w_from = jnp.sin(half_pi * (hi - step) / span) ** 2
        w_to = jnp.sin(half_pi * (step - lo) / span) ** 2
        return v_from * w_from + v_to * w_to

    return schedule


def onecycle_schedules(
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[optax.Schedule, optax.Schedule]:
    """torch ``OneCycleLR`` (two-phase cosine, ``cycle_momentum=True``) as optax schedules.

    Returns ``(lr_schedule, beta1_schedule)``: step count (int scalar) -> value of update
    ``count`` (float32 scalar; float64 under ``jax_enable_x64``). lr goes
    ``max_lr/div_factor -> max_lr -> max_lr/(div_factor*final_div_factor)``, beta1 goes
    ``max_momentum -> base_momentum -> max_momentum``.
    """
    total_steps = int(total_steps)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
    if float(pct_start * total_steps) - 1.0 == 0.0:
        # torch divides by zero here (phase 1 has zero length and contains step 0).
        raise ValueError(
            f"pct_start * total_steps == 1 ({pct_start} * {total_steps}) gives an empty "
            "warm-up phase; torch OneCycleLR fails for this configuration too"
        )
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    lr = _two_phase_cosine(total_steps, pct_start, initial_lr, max_lr, min_lr)
    beta1 = _two_phase_cosine(
        total_steps, pct_start, max_momentum, base_momentum, max_momentum
    )
    return lr, beta1


def with_epoch_resets(schedule: optax.Schedule, steps_per_epoch: int,
                      reset_lr: float) -> optax.Schedule:
    """``schedule`` with updates ``k * steps_per_epoch`` (k >= 1, the first update of every
    epoch after the first) at ``reset_lr``: the reference's epoch-end lr reset."""

    def schedule_with_resets(count):
        value = schedule(count)
        first_of_epoch = (count > 0) & (count % steps_per_epoch == 0)
        return jnp.where(first_of_epoch, jnp.asarray(reset_lr, value.dtype), value)

    return schedule_with_resets


def _adam_coupled_l2(learning_rate, b1, b2, eps, weight_decay):
    """torch Adam with ``weight_decay``: L2 term added to the gradient, then Adam."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_optimizer(
    total_steps: int,
    *,
    max_lr: float = 3e-4,
    weight_decay: float = 5e-4,
    b2: float = 0.999,
    eps: float = 1e-8,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    reset_lr_every: int = 0,
    reset_lr: float = 1e-4,
) -> optax.GradientTransformation:
    """torch ``Adam(weight_decay)`` driven by ``OneCycleLR`` over ``total_steps`` updates.

    ``total_steps`` = epochs * steps_per_epoch. ``reset_lr_every`` > 0 (steps per epoch):
    the first update of every later epoch at ``reset_lr`` (the reference's reset). ``update``
    needs ``params`` (for the L2 term). The state is an ``optax.InjectStatefulHyperparamsState``; see
    :func:`current_learning_rate`.
    """
    lr_schedule, beta1_schedule = onecycle_schedules(
        total_steps,
        max_lr,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
    )
    if reset_lr_every:
        lr_schedule = with_epoch_resets(lr_schedule, reset_lr_every, reset_lr)
    return optax.inject_hyperparams(_adam_coupled_l2)(
        learning_rate=lr_schedule,
        b1=beta1_schedule,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
    )


def current_learning_rate(opt_state) -> jnp.ndarray:
    """Learning rate of the most recent update of a :func:`make_optimizer` state.

    Before any update: the lr of the first one. After ``t`` updates this is
    ``lr_schedule(t - 1)``; torch's ``optimizer.param_groups[0]['lr']`` read after
    ``scheduler.step()`` (as the reference logs it) is the NEXT one,
    ``lr_schedule(opt_state.count)`` with ``lr_schedule`` from
    :func:`onecycle_schedules`.
    """
    return opt_state.hyperparams["learning_rate"]
