"""Every output of every reference fixture, recomputed by `crckd_jax.parity`.

Tolerances are stated per kind in `crckd_jax/parity.py` (float32: rtol 1e-5, and rtol 1e-4
for the nine chained steps of train_steps.npz; the absolute floors there say why they are
needed).
"""

import functools
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from crckd_jax import parity

# The reference fixtures of the authors' code. Written with torch by this project instead:
# augment_affine.npz (torchvision's augmentation, checked pixel for pixel by
# tests/test_augment.py) and onecycle_reset.npz (the epoch-end lr reset, tests/test_optim.py).
FIXTURES = sorted(p for p in (pathlib.Path(__file__).parent / "fixtures").glob("*.npz")
                  if p.name not in ("augment_affine.npz", "onecycle_reset.npz"))
EXPECTED_KIND = {
    "ccd_crp_step.npz": "ccd_crp_step", "ccd_crp_step_paper.npz": "ccd_crp_step",
    "ccd_crp_two_steps.npz": "ccd_crp_two_steps", "mean_teacher.npz": "mean_teacher",
    "weighted_ce.npz": "weighted_ce", "metrics.npz": "metrics",
    "densenet_small.npz": "densenet", "optimizer_onecycle.npz": "optimizer",
    "train_steps.npz": "train_steps",
}
# Keys of each kind that are inputs, not outputs to recompute.
INPUTS = {
    "ccd_crp_step": {"embed_s_weight", "embed_s_bias", "embed_t_weight", "embed_t_bias",
                     "memory_v1_in", "memory_v2_in", "z_v1_in", "z_v2_in", "f_s", "f_t",
                     "batch_index", "batch_labels", "contrast_idx_in", "nce_p", "nce_k",
                     "nce_t", "nce_m", "n_data", "num_classes", "train_labels",
                     "class_counts"},
    "mean_teacher": {"logits_s", "logits_t", "batch_size", "rampup_epochs", "rampup_length",
                     "p_student", "p_teacher_in", "global_steps", "ema_decay"},
    "weighted_ce": {"logits", "labels", "class_counts"},
    "metrics": {"logits", "probs", "gt"},
    "densenet": {"x", "growth_rate", "block_config", "num_init_features", "bn_size",
                 "num_classes", "bn_momentum", "bn_eps"},
    "optimizer": {"p0", "grad_a", "grad_c", "epochs", "steps_per_epoch", "base_lr",
                  "max_lr", "beta2", "weight_decay", "adam_eps", "pct_start", "div_factor",
                  "final_div_factor", "base_momentum", "max_momentum"},
    "train_steps": {"memory_v1_0", "memory_v2_0", "image_student", "image_teacher", "label",
                    "index", "contrast_idx", "rot_mask", "flip_mask", "batch_count",
                    "train_labels", "class_weight", "num_classes", "growth_rate",
                    "block_config", "num_init_features", "bn_size", "hidden_dim", "feat_dim",
                    "image_size", "batch_size", "bn_groups", "steps_per_epoch", "epochs",
                    "begin_epoch", "base_lr", "max_lr", "weight_decay", "ema_decay", "nce_p",
                    "nce_k", "nce_t", "nce_m", "consistency", "rampup_epochs", "ccd_weight",
                    "crp_weight", "versions"},
}
# Prefixes of input keys: a state dict (densenet), the initial state (train_steps).
INPUT_PREFIXES = ("sd/", "student0/", "teacher0/", "embed0_s/", "embed0_t/")


@functools.cache
def recomputed(name: str) -> tuple[dict, dict]:
    """(reference, our outputs) of a fixture, computed once per test session (the
    train_steps recomputation compiles and runs a whole train step: ~1.5 min on 2 cores)."""
    ref = dict(np.load(pathlib.Path(__file__).parent / "fixtures" / name))
    return ref, parity.recompute(ref)


def test_every_kind_of_the_parity_module_is_checked_against_a_fixture():
    """Each recomputation path of `crckd_jax.parity` has a reference fixture here, and each
    fixture is recognised as the kind it was written as."""
    kinds = {path.name: parity.kind_of(dict(np.load(path))).name for path in FIXTURES}
    assert kinds == EXPECTED_KIND
    assert set(kinds.values()) == {kind.name for kind in parity.KINDS}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fixture_matches_reference(path):
    ref = dict(np.load(path))
    kind = parity.kind_of(ref)
    assert kind.name == EXPECTED_KIND[path.name]
    rows = parity.compare_all(path.name, ref, recomputed(path.name)[1])
    compared = {r.key for r in rows}
    if kind.name == "ccd_crp_two_steps":
        inputs = {k + s for k in INPUTS["ccd_crp_step"] for s in ("", "_1", "_2")}
        inputs -= {f"{k}_in_2" for k in ("memory_v1", "memory_v2", "z_v1", "z_v2")}
    else:
        inputs = INPUTS[kind.name]
    assert set(ref) - inputs - {k for k in ref if k.startswith(INPUT_PREFIXES)} == compared
    failed = [r.line() for r in rows if not r.ok]
    assert not failed, "\n".join(failed)


def test_train_steps_covers_the_whole_state_and_reports_a_wrong_value():
    """Every parameter, running statistic and Adam moment of the final state is compared,
    and a reference value 2e-4 off (twice the tolerance) in one step's loss, one parameter,
    one memory row or one second moment is reported."""
    ref, ours = recomputed("train_steps.npz")
    initial = {k.removeprefix("student0/") for k in ref if k.startswith("student0/")}
    assert initial == {k.removeprefix("student/") for k in ours if k.startswith("student/")}
    params = {k.removeprefix("student/") for k in initial if not k.endswith(("running_mean",
                                                                              "running_var"))}
    assert {k.removeprefix("adam_v/student/") for k in ours if k.startswith("adam_v/student/")
            } == params
    assert len(ref["batch_count"]) >= 8 and ref["batch_count"].min() < ref["batch_size"]
    for key in ("step_crp", "student/features.conv0.weight", "memory_v2",
                "adam_v/embed_t/weight"):
        bad = dict(ref)
        bad[key] = ref[key].copy()
        at = np.unravel_index(np.argmax(np.abs(ref[key])), ref[key].shape)
        bad[key][at] *= np.float32(1 + 2e-4)
        rows = {r.key: r for r in parity.compare_all("bad.npz", bad, ours)}
        assert not rows[key].ok, key
        assert sum(not r.ok for r in rows.values()) == 1


def test_command_line_reports_every_key_and_fails_on_a_wrong_value(tmp_path):
    ref = dict(np.load(FIXTURES[0].parent / "weighted_ce.npz"))
    ref["loss"] = ref["loss"] * np.float32(1.001)
    bad = tmp_path / "weighted_ce_bad.npz"
    np.savez(bad, **ref)
    good = FIXTURES[0].parent / "mean_teacher.npz"
    out = subprocess.run([sys.executable, "-m", "crckd_jax.parity", str(good), str(bad)],
                         capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 1
    assert lines[-1] == "parity: 6 ok, 1 failed"
    assert "weighted_ce_bad.npz loss " in out.stdout and lines[-2].endswith("FAIL")
    assert all(len(line.split()) == 5 for line in lines[:-1])


def test_unrecognised_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="unrecognised parity file"):
        parity.kind_of({"foo": np.zeros(1)})
