"""The failures a user can meet, each with its exit status (docs/failures.md).

The command line (`crckd_jax.cli.execute`) ends every one of them with a single
`error: ...` line on stderr and the exit status of its class; a traceback is shown only
with `--verbosity=1` (or more) or `CRCKD_TRACEBACK=1` in the environment.
"""

from __future__ import annotations

EXIT_UNEXPECTED = 1  # a failure of none of the classes below (a bug: please report it)
EXIT_CONFIG = 2  # bad config key or value, a changed config on resume, a bad command line
EXIT_DATA = 3  # missing or unreadable data, images, CSV, input file
EXIT_CHECKPOINT = 4  # no checkpoint, or none that restores; a bad pretrained weight file
EXIT_IO = 5  # the disk is full or another I/O error while writing the run's files
EXIT_DIVERGED = 6  # a non-finite loss (TrainingDiverged); the last good checkpoint is kept
EXIT_LOCKED = 7  # another run holds the workdir's lock
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint: requeue (EX_TEMPFAIL)

EXIT_CODES = {
    "unexpected": EXIT_UNEXPECTED, "config": EXIT_CONFIG, "data": EXIT_DATA,
    "checkpoint": EXIT_CHECKPOINT, "io": EXIT_IO, "diverged": EXIT_DIVERGED,
    "locked": EXIT_LOCKED, "preempted": EXIT_PREEMPTED,
}


class RunError(Exception):
    """A failure with a message meant for the user and an exit status."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(RunError, ValueError):
    """A config key is unknown, missing, of the wrong type or out of range."""

    exit_code = EXIT_CONFIG


class DataError(RunError, ValueError):
    """The data on disk is not what a layout expects; the message names file, row or class."""

    exit_code = EXIT_DATA


class CheckpointError(RunError, ValueError):
    """A weight file cannot be read, or does not fit the model; the message names the file or
    lists every missing, unexpected and mis-shaped key."""

    exit_code = EXIT_CHECKPOINT


class WorkdirLocked(RunError):
    """Another live process holds the workdir's lock."""

    exit_code = EXIT_LOCKED


class ConfigChanged(RunError):
    """A resumed run's config differs from the run's config.json in keys that change the
    computation."""

    exit_code = EXIT_CONFIG


class CheckpointUnavailable(RunError):
    """No checkpoint, or none of the checkpoints can be restored."""

    exit_code = EXIT_CHECKPOINT


class StorageError(RunError):
    """Writing a run's file failed (full disk, permissions, ...)."""

    exit_code = EXIT_IO


class Preempted(RunError):
    """The run stopped on SIGTERM/SIGINT after its checkpoint was committed."""

    exit_code = EXIT_PREEMPTED


class TrainingDiverged(RunError, RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED
