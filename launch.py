"""Command line of crckd-jax.

    python launch.py --config configs/demo.py --workdir W [--mode train]

`--config` is a config file (`path.py` or `path.py:arg`) whose keys can be overridden, e.g.
`--config.data.dir=/data/HAM10000 --config.train.epochs=5`. Modes:
  prepare  build the data set, the folds and W/data_summary.json
  train    prepare if needed, then train fold `data.fold` in W (resumes from W/checkpoints)
  eval     evaluate the latest checkpoint of W on the test (and validation) split
  cv       train every fold of `data.folds` in W/fold_<k>, then W/cv_summary.{json,md}
  predict  write W/predictions.csv for the images of `predict.input`

Several processes (hosts) train together through `jax.distributed`: give every process
`--coordinator_address HOST:PORT --num_processes N --process_id I` (HOST is process 0's
machine), or nothing under a launcher JAX recognises (SLURM with several tasks, Open MPI,
a Cloud TPU VM, or JAX_COORDINATOR_ADDRESS in the environment). See docs/parallel.md.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from crckd_jax import config as config_lib
from crckd_jax import xla_options
from crckd_jax.data.sources import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for data, checkpoints and results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["prepare", "train", "eval", "cv", "predict"], "What to do."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: HOST:PORT of process 0's coordinator (the same on every process).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process runs: number of processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's id in [0, num_processes).",
    lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def _on_cloud_tpu_vm() -> bool:
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def cluster_environment(environ=None) -> str | None:
    """The multi-process launcher found in the environment, from which a bare
    `jax.distributed.initialize()` takes its settings; None for a single process."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if all(k in env for k in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU"
    if environ is None and _on_cloud_tpu_vm():
        return "Cloud TPU"
    return None


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, environ=None) -> str | None:
    """Starts `jax.distributed` when the flags or the environment ask for several processes.

    Must run before any JAX computation. Returns how the processes were found (None: a
    single process, nothing started).
    """
    given = (coordinator_address, num_processes, process_id)
    if num_processes == 1 and coordinator_address is None:
        return None  # explicitly one process
    if all(v is None for v in given):
        source = cluster_environment(environ)
        if source is None:
            return None
    else:
        source = "flags"
    import jax

    # All three flags: no launcher's environment overrides them (under SLURM it would also
    # restrict each process to one local device); each process uses the devices it sees.
    detection = "deactivate" if None not in given else None
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   cluster_detection_method=detection)
    except (ValueError, TypeError) as e:
        raise SystemExit(
            f"error: jax.distributed.initialize ({source}): {e}; give --coordinator_address, "
            "--num_processes and --process_id to every process") from e
    print(f"process {jax.process_index()} of {jax.process_count()} ({source}): "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
    return source


def run(mode: str, config, workdir: str) -> None:
    # Imported here so that a bad flag or config fails before JAX starts.
    from crckd_jax import cv, predict, train
    from crckd_jax.data import prepare

    if mode == "prepare":
        prepare.prepare(config, workdir)
    elif mode == "train":
        train.train_and_evaluate(config, workdir)
    elif mode == "eval":
        train.evaluate_checkpoint(config, workdir)
    elif mode == "cv":
        cv.run_cv(config, workdir)
    else:
        predict.predict(config, workdir)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error for a config override of an unknown key."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        known = config_lib.RULES
        for arg in argv[1:]:
            key = arg.removeprefix("--config.").split("=")[0]
            if arg.startswith("--config.") and key not in known:
                raise SystemExit(f"error: unknown config key {key!r} (in {arg}); known keys: "
                                 f"{', '.join(known)}") from e
        raise SystemExit(f"error: {e}") from e
    except flags.Error as e:  # e.g. a value of the wrong type: names the flag and value
        raise SystemExit(f"error: {e}") from e


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        run(_MODE.value, config, _WORKDIR.value)
    except (DataError, config_lib.ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    xla_options.configure()  # before JAX starts: the CPU backend's faster kernels
    app.run(main, flags_parser=parse_flags)
