"""Several processes (hosts) in one run: finding them and starting `jax.distributed`.

Every process gets `--coordinator_address HOST:PORT --num_processes N --process_id I`, or
nothing under a launcher JAX recognises (SLURM with several tasks, Open MPI, a Cloud TPU
VM, or JAX_COORDINATOR_ADDRESS in the environment). See docs/parallel.md.
"""

from __future__ import annotations

import os

from crckd_jax.errors import ConfigError

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
        raise ConfigError(f"jax.distributed.initialize ({source}): {e}; give "
                          "--coordinator_address, --num_processes and --process_id to every "
                          "process") from None
    print(f"process {jax.process_index()} of {jax.process_count()} ({source}): "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
    return source
