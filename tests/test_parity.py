"""Every output of every reference fixture, recomputed by `tools.parity`.

Tolerances are stated per kind in `tools/parity.py` (float32: rtol 1e-5; for the nine
chained steps of train_steps.npz 1e-5 to 1e-4 of each key's largest entry, derived from the
reference's own float32 rounding stored in the file; the absolute floors there say why they
are needed).
"""

import functools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tools import parity

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = sorted((ROOT / "tests" / "fixtures").glob("*.npz"))
EXPECTED_KIND = {
    "ccd_crp_step.npz": "ccd_crp_step", "ccd_crp_step_paper.npz": "ccd_crp_step",
    "ccd_crp_two_steps.npz": "ccd_crp_two_steps", "mean_teacher.npz": "mean_teacher",
    "weighted_ce.npz": "weighted_ce", "metrics.npz": "metrics",
    "densenet_small.npz": "densenet", "optimizer_onecycle.npz": "optimizer",
    "train_steps.npz": "train_steps", "onecycle_reset.npz": "optimizer_reset",
    "augment_affine.npz": "augment",
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
                    "crp_weight", "versions", "decision_margin", "float32_spread_keys",
                    "float32_spread"},
    "optimizer_reset": {"p0", "grads", "epochs", "steps_per_epoch", "base_lr", "max_lr",
                        "weight_decay", "versions"},
    # the draws are torchvision's distributions, tested by tests/test_augment.py
    "augment": {"normalize_input", "normalized_cases_64", "versions"},
}
# Prefixes of input keys: a state dict (densenet), the initial state and the conditioning
# record (train_steps), the augmentation cases and torchvision's draws (augment).
INPUT_PREFIXES = ("sd/", "student0/", "teacher0/", "embed0_s/", "embed0_t/", "images_",
                  "angle_", "tx_", "ty_", "flip_", "draw_")


@functools.cache
def recomputed(name: str) -> tuple[dict, dict]:
    """(reference, our outputs) of a fixture, computed once per test session (the
    train_steps recomputation compiles and runs a whole train step: ~1.5 min on 2 cores)."""
    ref = dict(np.load(pathlib.Path(__file__).parent / "fixtures" / name))
    return ref, parity.recompute(ref)


def test_every_kind_of_the_parity_module_is_checked_against_a_fixture():
    """Each recomputation path of `tools.parity` has a reference fixture here, and each
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
    and a reference value 2e-4 off (twice the largest tolerance, relative to the key's
    largest entry) in one step's loss, one parameter, one memory row or one second moment
    is reported, and only that key."""
    ref, ours = recomputed("train_steps.npz")
    initial = {k.removeprefix("student0/") for k in ref if k.startswith("student0/")}
    assert initial == {k.removeprefix("student/") for k in ours if k.startswith("student/")}
    params = {k.removeprefix("student/") for k in initial if not k.endswith(("running_mean",
                                                                              "running_var"))}
    assert {k.removeprefix("adam_v/student/") for k in ours if k.startswith("adam_v/student/")
            } == params
    assert len(ref["batch_count"]) >= 8 and ref["batch_count"].min() < ref["batch_size"]
    assert ref["batch_count"].min() // int(ref["bn_groups"]) >= 8  # BatchNorm groups
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
    out = subprocess.run([sys.executable, "-m", "tools.parity", str(good), str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 1
    assert lines[-1] == "parity: 6 ok, 1 failed"
    assert "weighted_ce_bad.npz loss " in out.stdout and lines[-2].endswith("FAIL")
    assert all(len(line.split()) == 5 for line in lines[:-1])


def test_unrecognised_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="unrecognised parity file"):
        parity.kind_of({"foo": np.zeros(1)})


def test_train_steps_tolerances_come_from_the_fixtures_float32_spread():
    """Each key family's tolerance is ten times the reference's own float32-vs-float64 spread
    stored in the file, rounded up to 1, 2 or 5 x 10^k, within [1e-5, 1e-4]; the generator
    refused inputs whose spread exceeds a tenth of that (half for the Adam moments) or whose
    decisions come near a tie."""
    ref, ours = recomputed("train_steps.npz")
    kind = parity.kind_of(ref)
    assert set(ref["float32_spread_keys"]) == {k for k in ours if k != "adam_step"}
    spreads = parity.family_spreads(ref)
    for key in ours:
        rtol, atol = kind.tolerance(key, ref)
        spread = spreads[parity.train_steps_key_kind(key)]
        assert 1e-5 <= rtol <= 1e-4 and atol == 0.0, key
        assert spread <= rtol / (2 if key.startswith("adam_") else 10), key
    assert float(ref["decision_margin"]) > 4
    assert kind.tolerance("step_loss", {}) == (1e-4, 0.0)  # without the record


@pytest.mark.parametrize("isa", ["AVX2", "SSE4_2"])
def test_every_fixture_holds_under_a_narrower_instruction_set(isa):
    """XLA's CPU code restricted to an older instruction set rounds differently (vector
    width, FMA); every fixture must still pass, so that none depends on the CPU it was
    checked on. Runs without the persistent compilation cache, whose executables were
    compiled for the default instruction set."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}".strip()
    out = subprocess.run([sys.executable, "-m", "tools.parity", *map(str, FIXTURES)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].endswith(" 0 failed")
