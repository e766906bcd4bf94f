"""The train or eval step compiled for an accelerator this machine does not have: what XLA
would launch on it per step, measured without the accelerator.

    python benchmarks/deviceless.py --target h200 [--program train_step,eval_step]
        [--model densenet121] [--image-size 224] [--batch-size 64] [--dtype bfloat16]
        [--memory bank] [--kernels auto|cpu|standard] [--hlo-dir DIR]

The program is the one the trainer runs: `crckd_jax.builder.build_run` (the call
`Trainer.build` makes), compiled through its `DataParallel` for the target's devices.
Targets `h100` and `h200` need the CUDA plugin (`pip install ".[cuda13]"`, about 4 GB of
wheels; no GPU or driver): XLA compiles for the GPU described by the target's device info,
without autotuning (kernel choices may differ somewhat from a real device; fusions and
buffers are XLA's). `cpu` compiles for this machine (a check of the report itself).

Per program: kernels per step by kind, bytes moved per step (XLA's cost analysis where it
answers, else operands plus results of every kernel, an upper bound; the line says which),
temporaries, the floor time of those bytes at the target's memory bandwidth, the compile
time. The last line per program:
`RESULT target=<t> program=<p> kernels=<n> hbm_gib=<x> temp_gib=<y> floor_ms=<z> compile_s=<s>`
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# GpuTargetConfig (protobuf text) of the GPU targets: the device's description as the CUDA
# plugin reports it on the device, with cuDNN 9.13 and CUDA 13.0.
_GPU_INFO = (
    'gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32 '
    'shared_memory_per_block: 49152 shared_memory_per_core: 233472 '
    'threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 '
    'block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 '
    'memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98 '
    'device_memory_size: {memory} shared_memory_per_block_optin: 232448 '
    'cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 '
    'registers_per_block_limit: 65536 }} platform_name: "CUDA" '
    'dnn_version_info {{ major: 9 minor: 13 }} runtime_version {{ major: 13 minor: 0 patch: 0 }} '
    'device_description_str: "{name}"')


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator to compile for: its name, memory bandwidth (bytes/s), memory (bytes)."""

    name: str
    bandwidth: float
    memory: int

    @property
    def is_gpu(self) -> bool:
        return self.name.startswith("NVIDIA")


TARGETS = {
    "h100": Target("NVIDIA H100 80GB HBM3", 3_352_320_000_000, 84_929_347_584),
    "h200": Target("NVIDIA H200", 4_800_000_000_000, 150_000_000_000),
    "cpu": Target("this machine's CPU", 0.0, 0),
}
PROGRAMS = ("train_step", "eval_step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), default="h200")
    p.add_argument("--program", default="train_step",
                   help="comma-separated, of " + ", ".join(PROGRAMS))
    p.add_argument("--model", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--memory", choices=("bank", "queue"), default="bank")
    p.add_argument("--num-items", type=int, default=2929, help="training items N (bank rows)")
    p.add_argument("--num-positives", type=int, default=20)
    p.add_argument("--num-negatives", type=int, default=4096)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--kernels", choices=("auto", "cpu", "standard"), default="auto",
                   help="the model's layer implementations ('auto': by the target)")
    p.add_argument("--top", type=int, default=15, help="kinds of kernels listed")
    p.add_argument("--hlo-dir", default=None, help="write each optimized program here")
    args = p.parse_args(argv)
    args.programs = [x.strip() for x in args.program.split(",") if x.strip()]
    unknown = [x for x in args.programs if x not in PROGRAMS]
    if unknown:
        p.error(f"unknown program(s) {unknown}: expected some of {', '.join(PROGRAMS)}")
    return args


def target_devices(target: Target):
    """The devices to compile for: a deviceless one-GPU topology, or this machine's CPU."""
    import jax

    if not target.is_gpu:
        return jax.devices("cpu")[:1]
    from jax.experimental import topologies

    config = _GPU_INFO.format(bandwidth=int(target.bandwidth), memory=target.memory,
                              name=target.name)
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                topology="1x1x1")
    except Exception as e:  # no CUDA plugin, or one that cannot describe the target
        sys.exit(f"error: cannot describe {target.name} for a deviceless compile ({e}); "
                 'install the CUDA plugin: pip install ".[cuda13]"')
    return topology.devices


def build(args, devices):
    """The run of the benchmark's settings, compiled for `devices` (the trainer's build)."""
    from crckd_jax import builder
    from crckd_jax.settings import Settings

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import class_counts

    s, r = Settings(), dataclasses.replace
    settings = r(
        s, seed=0,
        data=r(s.data, image_size=args.image_size),
        model=r(s.model, name=args.model),
        train=r(s.train, batch_size=args.batch_size, dtype=args.dtype, epochs=10,
                steps_per_epoch=1000),
        memory=r(s.memory, kind=args.memory, num_positives=args.num_positives,
                 num_negatives=args.num_negatives, embed_dim=args.embed_dim,
                 queue_size=max(args.num_positives, args.num_items // 5)),
        loss=r(s.loss, preset="paper"))
    data = builder.DataDescription.from_counts(class_counts(args.num_items))
    return builder.build_run(settings, data, kernels=args.kernels, devices=devices)


def lower(run, program: str):
    """The jitted program of `run` lowered for abstract inputs (nothing is allocated)."""
    state = run.abstract_state()
    batch = run.abstract_batch()
    if program == "train_step":
        return run.train_step.lower(state, batch)
    return run.eval_step[False].lower(state, {"image": batch["image"]})


def report(args, target: Target, run, program: str) -> dict:
    """Compiles `program` and prints its kernels, bytes and RESULT line; returns them."""
    import hlo_report

    lowered = lower(run, program)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        pathlib.Path(args.hlo_dir, f"{args.target}_{program}.hlo.txt").write_text(text)
    stats = hlo_report.program_stats(text)
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    xla_bytes = cost.get("bytes accessed")
    hbm, estimator = ((xla_bytes, "XLA cost analysis") if xla_bytes
                      else (stats.hbm_bytes, "operands + results per kernel, upper bound"))
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0
    floor_ms = hbm / target.bandwidth * 1e3 if target.bandwidth else float("nan")
    print(f"\n{program} for {target.name}: {stats.num_kernels} kernels per step, "
          f"{hbm / 2**30:.2f} GiB moved ({estimator}), {temp / 2**30:.2f} GiB of "
          f"temporaries, floor {floor_ms:.1f} ms, compiled in {compile_s:.1f} s")
    for kind, n in stats.kernels.most_common(args.top):
        print(f"  {n:6d}  {kind}")
    if stats.collectives:
        print("  collectives: " + ", ".join(f"{k} {n}" for k, n in stats.collectives.items()))
    result = {"target": args.target, "program": program, "kernels": stats.num_kernels,
              "hbm_gib": hbm / 2**30, "temp_gib": temp / 2**30, "floor_ms": floor_ms,
              "compile_s": compile_s}
    print(f"RESULT target={args.target} program={program} kernels={stats.num_kernels} "
          f"hbm_gib={hbm / 2**30:.2f} temp_gib={temp / 2**30:.2f} floor_ms={floor_ms:.1f} "
          f"compile_s={compile_s:.0f}", flush=True)
    return result


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    target = TARGETS[args.target]
    if target.is_gpu:  # before JAX starts: the plugin's topology without a GPU
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from crckd_jax.models.kernels import resolve_kernels

    run = build(args, target_devices(target))
    layers = resolve_kernels(args.kernels, run.parallel.mesh.devices.flat[0].platform)
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.dtype}, "
          f"{layers} layers, "
          f"{args.memory} memory, P = {args.num_positives}, K = {args.num_negatives}; "
          f"for {target.name}", flush=True)
    return [report(args, target, run, program) for program in args.programs]


if __name__ == "__main__":
    main()
