"""Command line of crckd-jax: `crckd` (installed), `python launch.py` (a clone), or
`python -m crckd_jax.cli`, all with the same flags.

    crckd --config demo --workdir W [--mode train]
    crckd --config configs/demo.py --workdir W          (a config file, e.g. in a clone)

`--config` is a config file (`path.py` or `path.py:arg`) or the name of a packaged config
(`demo`, `ham10000`, `aptos`, e.g. `aptos:mt_ccd`); its keys can be overridden, e.g.
`--config.data.dir=/data/HAM10000 --config.train.epochs=5`. Modes:
  prepare  build the data set, the folds and W/data_summary.json
  train    prepare if needed, then train fold `data.fold` in W (resumes from W/checkpoints)
  eval     evaluate the latest checkpoint of W on the test (and validation) split, or with
           `eval.input` on a labelled folder or CSV (the training data is not read)
  cv       train every fold of `data.folds` in W/fold_<k>, then W/cv_summary.{json,md}
  table    the ablation table: every rung of `table.rungs` x seed of `table.seeds` x fold of
           `data.folds` in W/<rung>/seed_<s>/fold_<k>, then W/table.{md,csv,json,png}
  predict  write W/predictions.csv for the images of `predict.input` (the training data is
           not read)
  export   write W/export/: the student's (`export.teacher`: and the teacher's) weights,
           class names and input size, for `crckd_jax.load_model(W)`

`eval`, `predict` and `export` use the run's saved config (W/config.json, written by `train`) when
`--config` is not given; `--config.KEY=VALUE` overrides still apply. A resumed `train` whose
config changes the computation stops, naming the keys, unless `--allow_config_change`.

Errors end with one `error: ...` line and an exit status per kind: 2 config, 3 data,
4 checkpoint, 5 disk/I/O, 6 non-finite loss, 7 workdir in use by another run, 75 stopped by
SIGTERM/SIGINT after saving a checkpoint (requeue), 1 anything else. `--verbosity=1` or
CRCKD_TRACEBACK=1 prints the traceback before that line (same exit status).

Several processes (hosts) train together through `jax.distributed`: give every process
`--coordinator_address HOST:PORT --num_processes N --process_id I` (HOST is process 0's
machine), or nothing under a launcher JAX recognises (SLURM with several tasks, Open MPI,
a Cloud TPU VM, or JAX_COORDINATOR_ADDRESS in the environment). See docs/parallel.md.

Independent processes can share the units of one cv or table workdir instead: start each
(e.g. one per GPU, `CUDA_VISIBLE_DEVICES=i`) with the same command and `--share_workdir`.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import threading
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from crckd_jax import config as config_lib
from crckd_jax import configs as packaged_configs
from crckd_jax import distributed, errors, modes, xla_options
from crckd_jax.run_folder import CONFIG_FILE, RunFolder

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file (path.py[:arg]) or packaged config name[:arg]: "
    + ", ".join(packaged_configs.names()) + ". Optional for eval, predict and export when the "
    "workdir holds the run's config.json.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for data, checkpoints and results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", list(modes.MODES), "What to do."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: HOST:PORT of process 0's coordinator (the same on every process).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process runs: number of processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's id in [0, num_processes).",
    lower_bound=0)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "train/cv: resume even when computation-changing config keys differ from the run's "
    "config.json (the changes are listed).")
_SHARE_WORKDIR = flags.DEFINE_bool(
    "share_workdir", False,
    "cv/table: train the workdir's units together with the other processes started with "
    "this flag on it (e.g. one per GPU); each unit is trained by the process that claims it "
    "first, the last to finish writes the summary or table.")
flags.mark_flags_as_required(["workdir"])
_FLAGS = (_CONFIG, _WORKDIR, _MODE, _ALLOW_CONFIG_CHANGE, _SHARE_WORKDIR, _COORDINATOR,
          _NUM_PROCESSES, _PROCESS_ID)
_RUN_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_config.py")


def fail(message: str, code: int) -> None:
    """Ends the program with one `error: ...` line on stderr and exit status `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)

def resolve_config_argument(argv: list[str]) -> list[str]:
    """`argv` with the value of `--config` (`--config V`, `--config=V`, one or two dashes)
    resolved by `crckd_jax.configs.resolve`: a packaged config's name becomes the path of its
    module file, which is what ml_collections' config flag loads. Overrides such as
    `--config.train.epochs=5` and everything after `--` are left alone.

    Raises SystemExit with one `error: ...` line for a missing file or an unknown name.
    """
    out = list(argv)
    i = 1
    while i < len(out):
        arg = out[i]
        if arg == "--":
            break
        match = re.fullmatch(r"(--?config)(=(.*))?", arg, flags=re.DOTALL)
        if match:
            if match.group(2) is None:  # the value is the next argument
                if i + 1 < len(out):
                    out[i + 1] = _resolve_config(out[i + 1])
                i += 1
            else:
                out[i] = f"{match.group(1)}={_resolve_config(match.group(3))}"
        i += 1
    return out


def _resolve_config(value: str) -> str:
    try:
        return packaged_configs.resolve(value)
    except packaged_configs.UnknownConfigError as e:
        fail(str(e), errors.EXIT_CONFIG)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` (one or two dashes) in `argv`, None if absent."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        match = re.fullmatch(rf"--?{name}(=(.*))?", arg, flags=re.DOTALL)
        if match:
            value = match.group(2) if match.group(1) else (
                argv[i + 1] if i + 1 < len(argv) else None)
    return value


def add_run_config(argv: list[str]) -> list[str]:
    """`argv` with `--config <W>/config.json` (through crckd_jax/run_config.py) when `--config`
    is not given and the mode is eval, predict or export; an `error:` line when a config is
    needed and W has none. Help and other flags are left to absl."""
    given = any(re.fullmatch(r"--?config(=.*)?", a, flags=re.DOTALL) for a in argv[1:])
    asked_help = any(a.lstrip("-").split("=")[0] in _HELP_FLAGS
                     for a in argv[1:] if a.startswith("-"))
    workdir = _flag_value(argv, "workdir")
    if given or asked_help or workdir is None:
        return argv
    mode = _flag_value(argv, "mode") or "train"
    saved = os.path.join(workdir, CONFIG_FILE)
    if mode in ("eval", "predict", "export"):
        if os.path.isfile(saved):
            return [argv[0], f"--config={_RUN_CONFIG}:{os.path.abspath(saved)}", *argv[1:]]
        fail(f"--config is required: {workdir} has no config.json (written by --mode train)",
             errors.EXIT_CONFIG)
    fail(f"--config is required for --mode {mode}", errors.EXIT_CONFIG)


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error for a config override of an unknown key, and
    exit status 0 after `--help` (absl exits with 1)."""
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        asked = any(a.lstrip("-") in _HELP_FLAGS for a in argv[1:] if a.startswith("-"))
        if e.code == 1 and asked:
            raise SystemExit(0) from None
        raise
    except (AttributeError, KeyError) as e:
        known = config_lib.KEYS
        for arg in argv[1:]:
            key = arg.removeprefix("--config.").split("=")[0]
            if arg.startswith("--config.") and key not in known:
                fail(f"unknown config key {key!r} (in {arg}); known keys: "
                     f"{', '.join(known)}", errors.EXIT_CONFIG)
        fail(str(e), errors.EXIT_CONFIG)
    except flags.Error as e:  # e.g. a value of the wrong type: names the flag and value
        fail(_without_config_traceback(str(e)), errors.EXIT_CONFIG)
    except SyntaxError as e:  # the config file itself does not parse
        fail(f"config file {e.filename}, line {e.lineno}: {e.msg}", errors.EXIT_CONFIG)
    except Exception as e:  # noqa: BLE001 - the config file's own code failed as it loaded
        source = (_flag_value(argv, "config") or "the config file").split(":")[0]
        fail(f"cannot load {source}: {type(e).__name__}: {e}", errors.EXIT_CONFIG)


def _without_config_traceback(message: str) -> str:
    """ml_collections puts the traceback of a failing `get_config` into the flag error; keep
    its first line (which names the flag and value) and the exception's own message."""
    if "Error whilst parsing config file" not in message:
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    last = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
    return f"{lines[0].split(': Error whilst')[0]}: {last}"


def _exit_code(e: BaseException) -> int:
    """The exit status of a failure (see crckd_jax/errors.py)."""
    if isinstance(e, errors.RunError):
        return e.exit_code
    if isinstance(e, FileNotFoundError):
        return errors.EXIT_DATA
    if isinstance(e, OSError):
        return errors.EXIT_IO
    return errors.EXIT_UNEXPECTED


def _message(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return ("interrupted (SIGINT) outside the training steps; a train run resumes from its "
                "last committed checkpoint")
    if isinstance(e, (errors.RunError, FileNotFoundError)):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        full = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"I/O error{where}: {e.strerror or e}{full}"
    return (f"unexpected {type(e).__name__}: {e} (run with CRCKD_TRACEBACK=1 for the "
            "traceback)")


def show_tracebacks() -> bool:
    """Whether failures show their traceback: CRCKD_TRACEBACK=1 or --verbosity >= 1."""
    if os.environ.get("CRCKD_TRACEBACK", "") not in ("", "0"):
        return True
    try:
        return flags.FLAGS["verbosity"].value >= 1 and flags.FLAGS["verbosity"].present
    except (KeyError, flags.Error):
        return False


def execute(mode: str, config, workdir: str, coordinator_address: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            allow_config_change: bool = False, tracebacks: bool | None = None,
            run_config_file: str | None = None, share_workdir: bool = False) -> None:
    """Checks `config` (and, to train, its initialisation: `config.require_initialisation`),
    starts `jax.distributed` if asked, runs `mode`. Every failure ends the program with one
    `error: ...` line and the exit status of its kind (crckd_jax/errors.py); with
    `tracebacks` (default: `show_tracebacks()`) its traceback is printed first, the line and
    the status stay the same. `run_config_file`: the run's config.json that `config` was
    read from (named in a config error)."""
    tracebacks = show_tracebacks() if tracebacks is None else tracebacks
    try:
        if not workdir.strip():
            raise errors.ConfigError(f"--workdir is {workdir!r}: expected a folder")
        settings = config_lib.to_settings(config)
        if mode in ("train", "cv", "table"):
            config_lib.require_initialisation(settings)
        if share_workdir and mode not in ("cv", "table"):
            raise errors.ConfigError(
                f"--share_workdir applies to --mode cv and --mode table, not --mode {mode}")
        several = distributed.initialize_distributed(coordinator_address, num_processes,
                                                     process_id)
        if share_workdir and several:
            raise errors.ConfigError(
                "--share_workdir trains each unit in one process: start the sharing "
                "processes without --num_processes / a multi-process launcher (each may "
                "use several local devices)")
        modes.run(mode, settings, RunFolder(workdir), allow_config_change, share_workdir)
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the command's last word
        if tracebacks:  # shown, and then the same last line and exit status as without
            traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else _exit_code(e)
        message = _message(e)
        if run_config_file and isinstance(e, errors.ConfigError):
            message += f" (config read from {run_config_file}, with the command line's overrides)"
        fail(message, code)


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tracebacks = show_tracebacks()
    # Libraries' error logs (orbax logs each failed background write with its traceback)
    # only in the traceback mode: otherwise the failure's one error line says it.
    logging.set_verbosity(logging.ERROR if tracebacks else logging.FATAL)
    if not tracebacks:
        sys.stderr = _WithoutClosedLoopTracebacks(sys.stderr)
    source = config_flags.get_config_filename(flags.FLAGS["config"])
    run_config_file = source.split(":", 1)[1] if source.startswith(_RUN_CONFIG + ":") else None
    try:
        execute(_MODE.value, _CONFIG.value, _WORKDIR.value, _COORDINATOR.value,
                _NUM_PROCESSES.value, _PROCESS_ID.value, _ALLOW_CONFIG_CHANGE.value, tracebacks,
                run_config_file, share_workdir=_SHARE_WORKDIR.value)
    except SystemExit as e:
        if e.code and not tracebacks:
            _silence_stderr()
        raise


class _WithoutClosedLoopTracebacks:
    """sys.stderr without the tracebacks of RuntimeError('Event loop is closed'): after a
    failed asynchronous checkpoint write, callbacks of orbax's writes still reach its
    closed event loops, and each printed its traceback (thousands of lines in one run)
    before the failure's error line. Several threads print them at once, their pieces
    interleaved, so a line is dropped when it holds nothing but pieces of such tracebacks;
    everything else passes through as written (a progress bar's line at once)."""

    _PIECES = re.compile(
        r"Traceback \(most recent call last\):"
        r'|File "[^"]*asyncio/base_events\.py", line \d+, in (?:call_soon_threadsafe|_check_closed)'
        r"|self\._check_closed\(\)|raise RuntimeError\('Event loop is closed'\)"
        r"|RuntimeError|Event loop is closed|:")
    _STARTS = ("Traceback (most recent call last):", 'File "', "self._check_closed()",
               "raise RuntimeError('Event loop is closed')", "RuntimeError",
               "Event loop is closed", ":")

    def __init__(self, stream):
        self._stream = stream
        self._partial = ""
        self._lock = threading.Lock()

    def _only_pieces(self, text: str) -> bool:
        return not self._PIECES.sub("", text).strip()

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                if not (line.strip() and self._only_pieces(line)):
                    self._stream.write(line + "\n")
            rest = self._PIECES.sub("", self._partial).strip()
            if self._partial.strip() and not any(p.startswith(rest) for p in self._STARTS):
                self._stream.write(self._partial)  # e.g. a progress bar's line, at once
                self._partial = ""
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stderr() -> None:
    """Sends what is still written to stderr to /dev/null: after a failure's error line,
    library threads that are still shutting down (orbax's event loops after a failed
    save: "Event loop is closed") print tracebacks while the interpreter exits."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _show_in_help() -> None:
    """`--help` prints the main module's docstring and the flags it owns: make those this
    module's, whichever script (`crckd`, launch.py) is the main module."""
    sys.modules["__main__"].__doc__ = __doc__
    for holder in _FLAGS:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])


def main(argv: list[str] | None = None) -> None:
    """The `crckd` command: `argv` (default `sys.argv`) as for `python launch.py`."""
    argv = list(sys.argv if argv is None else argv)
    argv = add_run_config(resolve_config_argument(argv))
    _show_in_help()
    xla_options.configure()  # before JAX starts: the CPU backend's faster kernels
    app.run(_main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
