"""Numeric parity with the reference implementation.

`python -m tools.parity FILE.npz [FILE.npz ...]` recognises each reference file's kind
from its keys, recomputes every output with this project's code (gradients included) from
the inputs stored in the same file, and prints one line per output key:
`<file> <key> <max_abs_err> <max_rel_err> ok|FAIL` (max_rel_err = max |diff| / max |ref|),
then `parity: N ok, M failed`; the exit status is 1 if anything failed. An output passes
when `|ours - ref| <= atol + rtol * |ref|` elementwise (integers must be equal).

Everything is recomputed at full float32 precision (`jax.default_matmul_precision
("highest")`): XLA's default on NVIDIA GPUs computes float32 convolutions and matrix
products in TF32 (10 explicit mantissa bits), far outside float32 tolerances. On an H200
with the default, the NCE normaliser Z of the CCD fixtures was off by 3.8 % (the TF32 error
of the scores, times 1/T = 14, inside an exponential) and the DenseNet logits by 2.4e-3.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Arrays = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared output."""

    file: str
    key: str
    max_abs: float
    max_rel: float
    ok: bool

    def line(self) -> str:
        return (f"{self.file} {self.key} {self.max_abs:.3e} {self.max_rel:.3e} "
                f"{'ok' if self.ok else 'FAIL'}")


@dataclasses.dataclass(frozen=True)
class Kind:
    """A fixture kind: keys that identify it, how to recompute, tolerances (rtol, atol) of a
    key of a file (`tolerance(key, file)`)."""

    name: str
    marker_keys: tuple[str, ...]
    recompute: Callable[[Arrays], dict[str, np.ndarray]]
    tolerance: Callable[[str, Arrays], tuple[float, float]]
    relative_to_max: bool = False  # rtol scales each key's largest |ref|, not each entry


# --------------------------------------------------------------------------- CCD + CRP
def _ccd_crp_call(d: Arrays, suffix: str, proj: Arrays) -> dict[str, np.ndarray]:
    """One reference `CCD_CRP_Loss.forward` call on a bank memory; keys get `suffix`."""
    from crckd_jax.distillation import ContrastConfig, ccd_crp
    from crckd_jax.memory import BankMemory, with_anchor_column
    from crckd_jax.models.networks import Embed

    g = lambda k: d[k + suffix]
    num_classes = int(d["num_classes"])
    memory = BankMemory.create(jax.random.key(0), d["train_labels"], num_classes,
                               g("memory_v1_in").shape[1])
    memory = memory.replace(
        student=jnp.asarray(g("memory_v1_in")), teacher=jnp.asarray(g("memory_v2_in")),
        z_student=jnp.float32(g("z_v1_in")), z_teacher=jnp.float32(g("z_v2_in")))
    config = ContrastConfig(
        num_positives=int(d["nce_p"]), num_negatives=int(d["nce_k"]),
        temperature=float(d["nce_t"]), momentum=float(d["nce_m"]), z_momentum=0.0)
    labels = jnp.asarray(g("batch_labels"), jnp.int32)
    index = jnp.asarray(g("batch_index"), jnp.int32)
    idx = with_anchor_column(jnp.asarray(g("contrast_idx_in"), jnp.int32), index)
    dim = memory.student.shape[1]

    def loss_fn(f_s, p_s, p_t, f_t):
        e_s = Embed(dim).apply({"params": p_s}, f_s)
        e_t = Embed(dim).apply({"params": p_t}, f_t)
        out, new_memory = ccd_crp(e_s, e_t, memory, labels, index, idx, config)
        return out.loss_ccd + out.loss_crp, (out, new_memory)

    params = lambda side: {"kernel": jnp.asarray(proj[f"embed_{side}_weight"]).T,
                           "bias": jnp.asarray(proj[f"embed_{side}_bias"])}
    grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True))
    (g_f, g_s, g_t), (out, mem) = grad_fn(
        jnp.asarray(g("f_s")), params("s"), params("t"), jnp.asarray(g("f_t")))
    result = {
        "embed_s_out": out.embed_s, "embed_t_out": out.embed_t, "contrast_idx_used": idx,
        "out_v1": out.out_s, "out_v2": out.out_t, "z_v1_out": mem.z_student,
        "z_v2_out": mem.z_teacher, "loss_s": out.loss_s, "loss_t": out.loss_t,
        "loss_ccd": out.loss_ccd, "memory_v1_out": mem.student,
        "memory_v2_out": mem.teacher, "anchors_s": out.centroids_s,
        "anchors_t": out.centroids_t, "loss_crp": out.loss_crp, "grad_f_s": g_f,
        "grad_embed_s_weight": g_s["kernel"].T, "grad_embed_s_bias": g_s["bias"],
        "grad_embed_t_weight": g_t["kernel"].T, "grad_embed_t_bias": g_t["bias"],
    }
    return {k + suffix: np.asarray(v) for k, v in result.items()}


def _ccd_crp_step(d: Arrays) -> dict[str, np.ndarray]:
    return _ccd_crp_call(d, "", d)


def _ccd_crp_two_steps(d: Arrays) -> dict[str, np.ndarray]:
    """Chains the state: call 2 starts from call 1's memories and Z, not the file's."""
    first = _ccd_crp_call(d, "_1", d)
    chained = dict(d)
    for key in ("memory_v1", "memory_v2", "z_v1", "z_v2"):
        chained[f"{key}_in_2"] = first[f"{key}_out_1"]
    second = _ccd_crp_call(chained, "_2", d)
    carried = {f"{k}_in_2": first[f"{k}_out_1"]
               for k in ("memory_v1", "memory_v2", "z_v1", "z_v2")}
    return {**first, **second, **carried}


def _ccd_tolerance(key: str, _file: Arrays) -> tuple[float, float]:
    """rtol 1e-5 everywhere. The absolute floors: 1e-6 on per-element arrays, whose small
    entries (scores far below 1, gradients near 0) carry rounding of float32 dot products
    taken over d terms; 1e-7 on the losses, which are differences of logarithms of float32
    sums (the CRP loss is ~6e-3 at paper size, a cancellation of terms of size ~1)."""
    if key.startswith(("loss", "z_")):
        return 1e-5, 1e-7
    return 1e-5, 1e-6


# ----------------------------------------------------------------------- mean teacher
def _mean_teacher(d: Arrays) -> dict[str, np.ndarray]:
    from crckd_jax import losses, teacher

    s, t = jnp.asarray(d["logits_s"]), jnp.asarray(d["logits_t"])
    log_q = jax.nn.log_softmax(t)
    kl = jnp.exp(log_q) * (log_q - jax.nn.log_softmax(s))
    p_s, p_t = jnp.asarray(d["p_student"]), jnp.asarray(d["p_teacher_in"])
    decay = float(d["ema_decay"])
    steps = jnp.asarray(d["global_steps"], jnp.int32)
    alphas = jax.vmap(lambda k: teacher.ema_alpha(k, decay))(steps)
    p_out = jax.vmap(lambda k: teacher.ema_update(p_t, p_s, k, decay))(steps)
    return {
        "kl_elementwise": np.asarray(kl),
        "consistency_dist": np.asarray(losses.softmax_kl(s, t, int(d["batch_size"]))),
        "sigmoid_rampup": np.asarray(losses.sigmoid_rampup(
            jnp.asarray(d["rampup_epochs"]), float(d["rampup_length"]))),
        "ema_alpha": np.asarray(alphas),
        "p_teacher_out": np.asarray(p_out),
    }


def _mean_teacher_tolerance(key: str, _file: Arrays) -> tuple[float, float]:
    # float32 recomputation of float64 reference schedules: a few float32 ulps.
    return 1e-6, 1e-7


# ------------------------------------------------------------------------ weighted CE
def _weighted_ce(d: Arrays) -> dict[str, np.ndarray]:
    from crckd_jax import losses

    weight = losses.class_weights(jnp.asarray(d["class_counts"]))
    loss = losses.weighted_cross_entropy(
        jnp.asarray(d["logits"]), jnp.asarray(d["labels"], jnp.int32), weight)
    return {"class_weight": np.asarray(weight), "loss": np.asarray(loss)}


def _tight_tolerance(key: str, _file: Arrays) -> tuple[float, float]:
    return 1e-5, 0.0


# -------------------------------------------------------------------------- optimizer
def _scan_optimizer(opt, p0: jax.Array, xs, gradient: Callable) -> tuple:
    """`opt` from `p0` over the steps of `xs`, fed `gradient(params, x)` at each step.

    Returns the final step count and, per step, the params after the update [T, n], the
    gradient fed [T, n], the learning rate and beta1 of the state after the update [T].
    """
    import optax

    from crckd_jax.optim import current_learning_rate

    def step(carry, x):
        params, state = carry
        grads = gradient(params, x)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), (params, grads, current_learning_rate(state),
                                 state.hyperparams["b1"])

    @jax.jit
    def run(p0, xs):
        (_, state), outs = jax.lax.scan(step, (p0, opt.init(p0)), xs)
        return state.count, outs

    return run(p0, xs)


def optimizer_trajectory(d: Arrays) -> dict[str, np.ndarray]:
    """T steps of `optim.make_optimizer` with gradients `grad_a[t] * p_t + grad_c[t]`.

    Returns params [T, n] after each step, the grads [T, n] fed, the learning rate each
    update used ("lr_applied" [T]) and the final step count.
    """
    from crckd_jax.optim import make_optimizer

    total = int(d["epochs"]) * int(d["steps_per_epoch"])
    opt = make_optimizer(
        total, max_lr=float(d["max_lr"]), weight_decay=float(d["weight_decay"]),
        b2=float(d["beta2"]), eps=float(d["adam_eps"]), pct_start=float(d["pct_start"]),
        div_factor=float(d["div_factor"]), final_div_factor=float(d["final_div_factor"]),
        base_momentum=float(d["base_momentum"]), max_momentum=float(d["max_momentum"]))
    count, (params, grads, lrs, _) = _scan_optimizer(
        opt, jnp.asarray(d["p0"]), (jnp.asarray(d["grad_a"]), jnp.asarray(d["grad_c"])),
        lambda p, ac: ac[0] * p + ac[1])
    return {"params": np.asarray(params), "grads": np.asarray(grads),
            "lr_applied": np.asarray(lrs, np.float64), "count": np.asarray(count)}


def _optimizer(d: Arrays) -> dict[str, np.ndarray]:
    from crckd_jax.optim import onecycle_schedules

    out = optimizer_trajectory(d)
    lr_s, b1_s = onecycle_schedules(
        int(d["epochs"]) * int(d["steps_per_epoch"]), float(d["max_lr"]),
        pct_start=float(d["pct_start"]), div_factor=float(d["div_factor"]),
        final_div_factor=float(d["final_div_factor"]),
        base_momentum=float(d["base_momentum"]), max_momentum=float(d["max_momentum"]))
    steps = jnp.arange(d["lr"].shape[0])
    return {"lr": np.asarray(jax.vmap(lr_s)(steps)), "beta1": np.asarray(jax.vmap(b1_s)(steps)),
            "grads": out["grads"], "params": out["params"]}


def _optimizer_tolerance(key: str, _file: Arrays) -> tuple[float, float]:
    """Schedules in float32 vs float64 references: a few ulps (rtol 1e-6). Gradients
    `a * p + c`: XLA may fuse into one FMA (one rounding instead of two) -> atol 1e-6 on
    values up to ~5. Params: float32 Adam vs torch's, rtol 1e-5 with a 1e-7 floor for
    parameters passing near zero."""
    if key in ("lr", "beta1"):
        return 1e-6, 0.0
    if key == "grads":
        return 1e-6, 1e-6
    return 1e-5, 1e-7


# ---------------------------------------------------------------------------- metrics
# The reference names: its "auc_ovo" is one-vs-rest, its "auc_macro" is one-vs-one.
_METRIC_NAMES = {"acc": "acc", "bacc": "bacc", "prec": "prec", "rec": "rec", "f1": "f1",
                 "auc_ovo": "auc_ovr", "auc_macro": "auc_ovo", "spec": "spec",
                 "kappa": "kappa"}


def _metrics(d: Arrays) -> dict[str, np.ndarray]:
    from crckd_jax.metrics import classification_metrics

    ours = classification_metrics(d["probs"], d["gt"], d["probs"].shape[1])
    return {ref: np.float64(ours[name]) for ref, name in _METRIC_NAMES.items()}


def _float64_tolerance(key: str, _file: Arrays) -> tuple[float, float]:
    return 1e-12, 0.0


# ------------------------------------------------------------- optimizer, epoch reset
def _optimizer_reset(d: Arrays) -> dict[str, np.ndarray]:
    """`make_optimizer` with the reference's epoch-end lr reset on the file's gradients."""
    from crckd_jax.optim import make_optimizer

    steps = int(d["steps_per_epoch"])
    opt = make_optimizer(int(d["epochs"]) * steps, max_lr=float(d["max_lr"]),
                         weight_decay=float(d["weight_decay"]), reset_lr_every=steps,
                         reset_lr=float(d["base_lr"]))
    _, (params, _, lrs, beta1s) = _scan_optimizer(
        opt, jnp.asarray(d["p0"]), jnp.asarray(d["grads"]), lambda p, g: g)
    return {"params": np.asarray(params), "lr": np.asarray(lrs, np.float64),
            "beta1": np.asarray(beta1s, np.float64)}


# ------------------------------------------------------------------------ augmentation
def _augment(d: Arrays) -> dict[str, np.ndarray]:
    """torchvision's affine + flip of every case (uint8, exact) and its normalisation."""
    from crckd_jax import augment

    cases = jax.jit(jax.vmap(augment.affine_flip, in_axes=(None, 0, 0, 0, 0)))
    out = {}
    for size in sorted(int(k.removeprefix("images_")) for k in d if k.startswith("images_")):
        out[f"out_{size}"] = np.stack([
            np.asarray(cases(image, *(d[f"{n}_{size}"][i] for n in ("angle", "tx", "ty",
                                                                     "flip"))))
            for i, image in enumerate(d[f"images_{size}"])])
    normalize = jax.jit(augment.normalize)
    out["normalize_output"] = np.asarray(normalize(d["normalize_input"]))
    out["normalized_64"] = np.asarray(normalize(d["out_64"][0, d["normalized_cases_64"]]))
    return out


def _augment_tolerance(key: str, _file: Arrays) -> tuple[float, float]:
    """Pixels are compared exactly (integers). Normalisation: torchvision computes
    (x / 255 - mean) / std, this project x * (1 / (255 std)) - mean / std: a few ulp of
    values up to ~2.6."""
    return 1e-6, 1e-6


# --------------------------------------------------------------------------- DenseNet
def _densenet(d: Arrays) -> dict[str, np.ndarray]:
    """Eval and train forwards of a torchvision DenseNet imported from the file's `sd/`."""
    from crckd_jax.models.densenet import CRCKDNet, DenseNetConfig
    from crckd_jax.models.torch_import import classifier_from_state_dict, import_densenet

    state_dict = {k[3:]: v for k, v in d.items() if k.startswith("sd/")}
    config = DenseNetConfig(int(d["growth_rate"]), tuple(d["block_config"]),
                            int(d["num_init_features"]), int(d["bn_size"]))
    model = CRCKDNet(config, int(d["num_classes"]))
    x = jnp.asarray(np.transpose(d["x"], (0, 2, 3, 1)))  # NCHW -> NHWC
    template = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    variables = import_densenet(state_dict, template, name="the file's DenseNet")
    weight, bias = classifier_from_state_dict(state_dict)

    @jax.jit
    def forward(variables):
        pooled_eval = model.apply(variables, x, train=False)["pooled"]
        out, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return pooled_eval, out["pooled"], updated["batch_stats"]["features"]["norm5"]

    pooled_eval, pooled_train, norm5 = forward(variables)
    logits = lambda pooled: pooled @ jnp.asarray(weight).T + jnp.asarray(bias)
    return {"pooled_eval": np.asarray(pooled_eval), "logits_eval": np.asarray(logits(pooled_eval)),
            "logits_train": np.asarray(logits(pooled_train)),
            "norm5_running_mean_after_train": np.asarray(norm5["mean"]),
            "norm5_running_var_after_train": np.asarray(norm5["var"])}


def _densenet_tolerance(key: str, _file: Arrays) -> tuple[float, float]:
    """Convolutions accumulate in another order than torch's (oneDNN vs XLA), over up to
    ~1000 terms per output through the whole network: rtol 1e-5 with an absolute floor of
    1e-5 for entries near zero."""
    return 1e-5, 1e-5


# ------------------------------------------------------------------------- train steps
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def _prefixed(d: Arrays, prefix: str) -> dict[str, np.ndarray]:
    """The entries `prefix/<key>` of the file as {key: array}."""
    return {k[len(prefix) + 1:]: v for k, v in d.items() if k.startswith(prefix + "/")}


def _network_variables(state_dict: Arrays, template: dict) -> tuple[dict, dict]:
    """(params, batch_stats) of a CRCKDNet from torchvision-named weights: the backbone
    through `torch_import.import_densenet`, the two Linear layers of the head transposed."""
    from crckd_jax.models.torch_import import import_densenet

    backbone = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    variables = import_densenet(backbone, template, name="the file's network")
    params = dict(variables["params"])
    for name in ("fc_layer", "classifier"):
        params[name] = {"kernel": jnp.asarray(state_dict[f"{name}.weight"]).T,
                        "bias": jnp.asarray(state_dict[f"{name}.bias"])}
    return params, variables["batch_stats"]


def _torch_named(prefix: str, *trees) -> dict[str, np.ndarray]:
    """Flax leaves under torch names `prefix/<module path>.<weight|bias|running_*>`, in
    torch layouts (conv [out, in, kh, kw], Linear [out, in])."""
    from flax import traverse_util

    out = {}
    for tree in trees:
        for path, leaf in traverse_util.flatten_dict(tree).items():
            value = np.asarray(leaf)
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif value.ndim == 2:
                value = value.T
            out[f"{prefix}/{'.'.join(path[:-1] + (_TORCH_LEAF[path[-1]],))}"] = value
    return out


def _embed_params(d: Arrays, prefix: str) -> dict:
    return {"kernel": jnp.asarray(d[f"{prefix}/weight"]).T,
            "bias": jnp.asarray(d[f"{prefix}/bias"])}


def _adam_moments(opt_state):
    """optax's ScaleByAdamState inside a `make_optimizer` state."""
    import optax

    (adam,) = [s for s in opt_state.inner_state if isinstance(s, optax.ScaleByAdamState)]
    return adam


def _train_steps(d: Arrays) -> dict[str, np.ndarray]:
    """The file's steps of the train step that `crckd_jax.builder.build_run` compiles for a
    `reference` run (on one device): CRCKDNet with BatchNorm groups and the double
    running-statistics update of norm0 .. denseblock3, the bank memory, the reference loss
    preset, torch Adam + OneCycle with the epoch-end reset, the teacher in train mode. The
    state starts from the file's initial weights, memory and (unset) Z; each step gets the
    file's two views (the teacher's already rotated), labels, indices and contrast indices
    (column 0 overwritten with the item's row, as the reference's memory does); a partial
    batch is laid out over the BatchNorm groups as the data pipeline lays it out
    (`pipeline.partial_batch_rows`), padding masked."""
    from crckd_jax import losses
    from crckd_jax.builder import DataDescription, build_run
    from crckd_jax.data.pipeline import partial_batch_rows
    from crckd_jax.memory import with_anchor_column

    num_classes, batch = int(d["num_classes"]), int(d["batch_size"])
    group = batch // int(d["bn_groups"])
    run = build_run(_train_steps_settings(d), DataDescription(
        tuple(map(str, range(num_classes))), np.asarray(d["train_labels"])),
        devices=jax.devices()[:1])
    if not np.allclose(losses.class_weights(run.data.class_counts), d["class_weight"],
                       rtol=1e-6):
        raise ValueError("the file's class weights are not those of its training labels")
    size = int(d["image_size"])
    model = run.networks.network
    template = jax.jit(lambda: model.init(
        jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False))()
    student, stats = _network_variables(_prefixed(d, "student0"), template)
    teacher, teacher_stats = _network_variables(_prefixed(d, "teacher0"), template)
    params = {"student": student, "embed_s": _embed_params(d, "embed0_s"),
              "embed_t": _embed_params(d, "embed0_t")}
    initial = run.create_state()
    memory = initial.memory.replace(student=jnp.asarray(d["memory_v1_0"]),
                                    teacher=jnp.asarray(d["memory_v2_0"]))
    state = run.parallel.put_state(initial.replace(
        params=params, batch_stats=stats, ema_params=teacher, ema_batch_stats=teacher_stats,
        opt_state=run.optimizer.init(params), memory=memory))

    per_step = {k: [] for k in ("step_ce", "step_mt", "step_ccd", "step_crp", "step_loss",
                                "step_lr", "step_beta1")}
    for t, count in enumerate(np.asarray(d["batch_count"])):
        rows = (np.arange(batch) if count == batch
                else partial_batch_rows(int(count), batch, group))
        take = lambda key: np.where(  # noqa: E731
            (rows >= 0).reshape((-1,) + (1,) * (d[key].ndim - 2)),
            d[key][t][np.maximum(rows, 0)], 0).astype(d[key].dtype)
        index = jnp.asarray(take("index"))
        inputs = {"image_student": take("image_student"), "image_teacher": take("image_teacher"),
                  "label": take("label"), "index": np.asarray(index),
                  "contrast_idx": np.asarray(with_anchor_column(
                      jnp.asarray(take("contrast_idx")), index)),
                  "mask": rows >= 0}
        state, metrics = run.train_step(state, run.parallel.put_batch(inputs),
                                        run.step_class_weight)
        metrics = run.parallel.get_outputs(metrics)
        for term in ("ce", "mt", "ccd", "crp", "loss"):
            per_step[f"step_{term}"].append(metrics[term])
        per_step["step_lr"].append(metrics["learning_rate"])
        per_step["step_beta1"].append(np.asarray(state.opt_state.hyperparams["b1"]))

    state = run.parallel.get_state(state)
    adam = _adam_moments(state.opt_state)
    out = {k: np.stack(v) for k, v in per_step.items()}
    out |= _torch_named("student", state.params["student"], state.batch_stats)
    out |= _torch_named("teacher", state.ema_params, state.ema_batch_stats)
    for side in ("s", "t"):
        out |= _torch_named(f"embed_{side}", state.params[f"embed_{side}"])
        for name, moments in (("adam_m", adam.mu), ("adam_v", adam.nu)):
            out |= _torch_named(f"{name}/embed_{side}", moments[f"embed_{side}"])
    for name, moments in (("adam_m", adam.mu), ("adam_v", adam.nu)):
        out |= _torch_named(f"{name}/student", moments["student"])
    out |= {"memory_v1": np.asarray(state.memory.student),
            "memory_v2": np.asarray(state.memory.teacher),
            "z_v1": np.asarray(state.memory.z_student),
            "z_v2": np.asarray(state.memory.z_teacher),
            "adam_step": np.asarray(adam.count)}
    return out


def _train_steps_settings(d: Arrays):
    """The run settings of a `train_steps` file: the reference protocol at its sizes."""
    from crckd_jax.models.densenet import DenseNetConfig
    from crckd_jax.models.presets import DENSENET_PRESETS
    from crckd_jax.settings import Settings

    network = DenseNetConfig(int(d["growth_rate"]), tuple(d["block_config"]),
                             int(d["num_init_features"]), int(d["bn_size"]))
    names = [name for name, preset in DENSENET_PRESETS.items() if preset == network]
    if not names:
        raise ValueError(f"the file's network {network} is none of {list(DENSENET_PRESETS)}")
    s = Settings()
    r = dataclasses.replace
    return r(
        s, seed=0,
        data=r(s.data, image_size=int(d["image_size"])),
        model=r(s.model, name=names[0], hidden_dim=int(d["hidden_dim"]),
                bn_group_size=int(d["batch_size"]) // int(d["bn_groups"]),
                reference_double_bn_update=True),
        train=r(s.train, epochs=int(d["epochs"]), steps_per_epoch=int(d["steps_per_epoch"]),
                batch_size=int(d["batch_size"]), ema_decay=float(d["ema_decay"]),
                teacher_bn="train", teacher_rotate=False,  # the file's view comes rotated
                matmul_precision="highest"),
        memory=r(s.memory, kind="bank", embed_dim=int(d["feat_dim"]),
                 num_positives=int(d["nce_p"]), num_negatives=int(d["nce_k"]),
                 temperature=float(d["nce_t"]), momentum=float(d["nce_m"])),
        loss=r(s.loss, preset="reference", begin_epoch=int(d["begin_epoch"]),
               ccd_weight=float(d["ccd_weight"]), crp_weight=float(d["crp_weight"]),
               consistency=float(d["consistency"]), rampup_epochs=int(d["rampup_epochs"])),
        optim=r(s.optim, max_lr=float(d["max_lr"]), weight_decay=float(d["weight_decay"]),
                reset_lr_each_epoch=True, learning_rate=float(d["base_lr"])))


def train_steps_key_kind(key: str) -> str:
    """The family of a train_steps output key: its tolerance is derived per family."""
    if key in ("step_lr", "step_beta1"):
        return "schedule"
    if key.startswith("step_"):
        return "loss"
    if key.startswith(("adam_m/", "adam_v/")):
        return key.split("/")[0]
    if key.endswith(("running_mean", "running_var")):
        return "running"
    if key.startswith(("memory_", "z_")):
        return "memory"
    return "parameter"


TRAIN_STEPS_MAX_TOLERANCE = 1e-4


def family_spreads(ref: Arrays) -> dict[str, float]:
    """{family: the largest spread of its keys} from the spreads a train_steps fixture
    stores per output key (`float32_spread_keys`, `float32_spread`): max |float32 -
    float64| / max |float64| of the reference's own two runs."""
    out: dict[str, float] = {}
    for key, spread in zip(ref.get("float32_spread_keys", ()), ref.get("float32_spread", ())):
        family = train_steps_key_kind(str(key))
        out[family] = max(out.get(family, 0.0), float(spread))
    return out


def _train_steps_tolerance(key: str, ref: Arrays) -> tuple[float, float]:
    """Relative to the key's largest entry (`Kind.relative_to_max`): ten times the spread the
    fixture measured between the reference's own float32 and float64 runs over the key's
    family (`family_spreads`), rounded up to 1, 2 or 5 x 10^k, at least 1e-5 (the float32
    standard) and at most 1e-4. A fixture without the spreads is held to 1e-4."""
    stored = family_spreads(ref).get(train_steps_key_kind(key))
    if stored is None:
        return TRAIN_STEPS_MAX_TOLERANCE, 0.0
    return min(TRAIN_STEPS_MAX_TOLERANCE, max(1e-5, _round_up_125(10 * stored))), 0.0


def _round_up_125(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= x (0 for x <= 0)."""
    if x <= 0:
        return 0.0
    exponent = np.floor(np.log10(x))
    for mantissa in (1, 2, 5, 10):
        if mantissa * 10 ** exponent >= x * (1 - 1e-9):
            return float(mantissa * 10 ** exponent)
    raise AssertionError(x)


KINDS: tuple[Kind, ...] = (
    Kind("train_steps", ("step_loss", "memory_v1_0", "adam_step"), _train_steps,
         _train_steps_tolerance, relative_to_max=True),
    Kind("ccd_crp_two_steps", ("f_s_1", "contrast_idx_in_2"), _ccd_crp_two_steps,
         _ccd_tolerance),
    Kind("ccd_crp_step", ("f_s", "contrast_idx_in", "memory_v1_in"), _ccd_crp_step,
         _ccd_tolerance),
    Kind("mean_teacher", ("kl_elementwise", "p_teacher_in"), _mean_teacher,
         _mean_teacher_tolerance),
    Kind("weighted_ce", ("logits", "class_weight", "loss"), _weighted_ce, _tight_tolerance),
    Kind("optimizer", ("p0", "grad_a", "grad_c", "params"), _optimizer, _optimizer_tolerance),
    Kind("metrics", ("probs", "gt", "auc_macro"), _metrics, _float64_tolerance),
    Kind("densenet", ("x", "logits_eval", "block_config"), _densenet, _densenet_tolerance),
    Kind("optimizer_reset", ("p0", "grads", "base_lr", "params"), _optimizer_reset,
         _optimizer_tolerance),
    Kind("augment", ("images_64", "out_64", "normalize_input"), _augment, _augment_tolerance),
)


def kind_of(ref: Arrays) -> Kind:
    """The kind whose marker keys all appear in the file."""
    for kind in KINDS:
        if all(k in ref for k in kind.marker_keys):
            return kind
    raise ValueError(f"unrecognised parity file: keys {sorted(ref)[:12]}...")


def compare(file: str, key: str, ours: np.ndarray, ref: np.ndarray,
            rtol: float, atol: float, relative_to_max: bool = False) -> Row:
    """Elementwise `|ours - ref| <= atol + rtol * |ref|`, or with `relative_to_max`
    `|ours - ref| <= atol + rtol * max |ref|`; integers must be equal."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return Row(file, key, float("inf"), float("inf"), False)
    if np.issubdtype(ref.dtype, np.integer):
        diff = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
        err = float(diff.max(initial=0))
        return Row(file, key, err, err, err == 0)
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max(initial=0.0))
    ok = bool(np.all(diff <= atol + rtol * (scale if relative_to_max else np.abs(ref))))
    max_abs = float(diff.max(initial=0.0))
    return Row(file, key, max_abs, max_abs / scale if scale else max_abs, ok)


def recompute(ref: Arrays) -> dict[str, np.ndarray]:
    """Every output of one reference file, recomputed by this project at full precision."""
    with jax.default_matmul_precision("highest"):
        return kind_of(ref).recompute(ref)


def compare_all(file: str, ref: Arrays, ours: Mapping[str, np.ndarray]) -> list[Row]:
    """`ours` (from `recompute`) against every output the file holds, at the kind's
    tolerances."""
    kind = kind_of(ref)
    return [compare(file, key, value, ref[key], *kind.tolerance(key, ref),
                    relative_to_max=kind.relative_to_max)
            for key, value in ours.items() if key in ref]


def check(file: str, ref: Arrays) -> list[Row]:
    """Recompute one reference file and compare every output it holds."""
    return compare_all(file, ref, recompute(ref))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tools.parity FILE.npz [FILE.npz ...]", file=sys.stderr)
        return 2
    rows = []
    for path in argv:
        with np.load(path) as data:
            ref = dict(data)
        file_rows = check(pathlib.Path(path).name, ref)
        for row in file_rows:
            print(row.line())
        rows += file_rows
    failed = sum(not r.ok for r in rows)
    print(f"parity: {len(rows) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
