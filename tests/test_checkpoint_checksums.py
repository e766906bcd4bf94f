"""Checkpoint checksums: every committed step records the size and SHA-256 of its files
(`checksums.json`), and a restore refuses a step whose files no longer match, as a damaged
checkpoint (train: moved aside; eval, predict, export: passed over, or one error line)."""

import errno
import hashlib
import importlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from crckd_jax import checkpoint, cli, errors
from crckd_jax.checkpoint import (CHECKSUMS_FILE, Checkpointer, ChecksumMismatch,
                                  restore_read_only, verify_checksums)


def state_of(step):
    """A state whose array data is stored uncompressed enough for a flipped byte to change
    a value instead of failing to decode (orbax would restore it without complaint)."""
    rng = np.random.default_rng(step)
    return {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
            "b": jnp.arange(5.0) * step}


def target():
    return {"w": jnp.zeros((64, 64), jnp.float32), "b": jnp.zeros(5)}


def save_steps(directory, steps, asynchronous=True):
    checkpoints = Checkpointer(str(directory), asynchronous=asynchronous)
    for step in steps:
        checkpoints.save(step, state_of(step), {"pos": step}, {"epoch": step})
    checkpoints.close()


def flip_array_byte(step_dir):
    """Flips one bit in the middle of the step's largest array data file; returns its path
    relative to the step folder."""
    data = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))
    return str(data.relative_to(step_dir))


def test_each_committed_step_records_the_size_and_sha256_of_its_files(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2, 3])  # keep 3, asynchronous
    for step in (1, 2, 3):
        step_dir = directory / str(step)
        record = json.loads((step_dir / CHECKSUMS_FILE).read_text())
        files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                       if p.is_file() and p.name != CHECKSUMS_FILE)
        assert list(record["files"]) == files and any("ocdbt" in f for f in files)
        for name, entry in record["files"].items():
            content = (step_dir / name).read_bytes()
            assert entry == {"size": len(content),
                             "sha256": hashlib.sha256(content).hexdigest()}
        assert not list(step_dir.glob(CHECKSUMS_FILE + ".*"))  # no temporary left
    # orbax lists and restores the steps as before; the record checks out.
    checkpoints = Checkpointer(str(directory), read_only=True)
    assert checkpoints.manager.all_steps() == [1, 2, 3]
    restored = checkpoints.restore(target(), 3)
    checkpoints.close()
    assert restored.checked
    np.testing.assert_array_equal(restored.state["w"], state_of(3)["w"])


def test_train_moves_a_newest_checkpoint_with_a_flipped_byte_aside_and_resumes_before(
        tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    flipped = flip_array_byte(directory / "2")
    lines = []
    checkpoints = Checkpointer(str(directory), asynchronous=False)
    restored = checkpoints.restore_newest_good(target(), log=lines.append)
    assert restored.step == 1 and restored.data == {"pos": 1} and restored.checked
    np.testing.assert_array_equal(restored.state["w"], state_of(1)["w"])
    moved = list((tmp_path / "damaged_checkpoints").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("2-")
    assert lines == [f"warning: checkpoint step 2 cannot be restored (ChecksumMismatch: "
                     f"{flipped} has another SHA-256 than when saved); moved to {moved[0]}, "
                     f"using an earlier one"]
    assert (moved[0] / flipped).is_file() and checkpoints.latest_step() == 1
    checkpoints.save(2, state_of(5), {"pos": 2}, {})  # the step is saved and recorded again
    checkpoints.close()
    assert verify_checksums(str(directory / "2"))


def test_read_only_restores_pass_over_a_flipped_byte_naming_the_file(tmp_path):
    """eval (the run's restore target) and export, predict, load_model (the target from the
    checkpoint's metadata) fall back to the previous step without moving anything."""
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    flipped = flip_array_byte(directory / "2")
    for make_target in (lambda _: target(), Checkpointer.single_device_target):
        lines = []
        restored = restore_read_only(str(directory), make_target, str(tmp_path), lines.append)
        assert restored.step == 1 and restored.checked
        np.testing.assert_array_equal(restored.state["w"], state_of(1)["w"])
        assert lines == [f"warning: checkpoint step 2 ({directory / '2'}) cannot be restored "
                         f"(ChecksumMismatch: {flipped} has another SHA-256 than when "
                         f"saved); using an earlier one"]
    assert (directory / "2").is_dir() and not (tmp_path / "damaged_checkpoints").exists()


def test_export_refuses_when_the_only_checkpoint_has_a_flipped_byte(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [3])
    flipped = flip_array_byte(directory / "3")
    tiny = importlib.import_module("crckd_jax.configs.demo").get_config("tiny")
    with pytest.raises(SystemExit) as info:
        cli.execute("export", tiny, str(tmp_path), tracebacks=False)
    err = capsys.readouterr().err
    assert info.value.code == errors.EXIT_CHECKPOINT and err.count("\n") == 1, err
    assert err == (f"error: no checkpoint in {directory} can be read (step 3: "
                   f"ChecksumMismatch: {flipped} has another SHA-256 than when saved)\n")
    assert not (tmp_path / "export").exists()


def test_a_checkpoint_without_checksums_restores_with_one_line_saying_so(tmp_path):
    """Saved by an earlier version, or by a run killed between orbax's commit and the
    record."""
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2], asynchronous=False)
    (directory / "2" / CHECKSUMS_FILE).unlink()
    for read_only in (True, False):
        lines = []
        checkpoints = Checkpointer(str(directory), read_only=read_only)
        restored = checkpoints.restore_newest_good(target(), log=lines.append)
        checkpoints.close()
        assert restored.step == 2 and not restored.checked
        np.testing.assert_array_equal(restored.state["w"], state_of(2)["w"])
        assert lines == [f"warning: checkpoint step 2 ({directory / '2'}) has no checksums "
                         f"({CHECKSUMS_FILE}: saved by an earlier version, or its run was "
                         f"killed before writing them); restored without checking its files"]
    assert (directory / "2").is_dir()


@pytest.mark.parametrize("damage, message", [
    ("remove", r"^state/_METADATA is missing$"),
    ("append", r"^state/_METADATA has \d+ bytes, \d+ when saved$"),
    ("record", rf"^{CHECKSUMS_FILE} does not read \(JSONDecodeError: "),
])
def test_a_missing_or_resized_file_or_an_unreadable_record_is_damage(tmp_path, damage,
                                                                     message):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1], asynchronous=False)
    step_dir = directory / "1"
    assert verify_checksums(str(step_dir))
    if damage == "remove":
        (step_dir / "state" / "_METADATA").unlink()
    elif damage == "append":
        with open(step_dir / "state" / "_METADATA", "ab") as f:
            f.write(b" ")
    else:
        (step_dir / CHECKSUMS_FILE).write_text('{"format": ')
    with pytest.raises(ChecksumMismatch, match=message):
        verify_checksums(str(step_dir))


def test_a_failed_write_of_the_checksums_is_a_storage_error(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"

    def full(step_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(step_dir, "x"))

    monkeypatch.setattr(checkpoint, "write_checksums", full)
    checkpoints = Checkpointer(str(directory))
    checkpoints.save(1, state_of(1), {}, {})
    with pytest.raises(errors.StorageError) as info:
        checkpoints.wait()
    checkpoints.close()
    assert str(info.value) == (
        f"writing the checksums of checkpoint step 1 failed: No space left on device "
        f"({directory / '1' / 'x'}); the last good checkpoint is step 1 in {directory}")
    assert Checkpointer(str(directory)).latest_step() == 1  # the step itself is committed
