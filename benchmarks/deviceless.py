"""The train or eval step compiled for an accelerator this machine does not have: what XLA
would launch on it per step, measured without the accelerator.

    python benchmarks/deviceless.py --target h200 [--program train_step,eval_step]
        [--model densenet121] [--image-size 224] [--batch-size 64] [--dtype bfloat16]
        [--memory bank] [--kernels auto|cpu|standard] [--folds K [--fold-axis-size G]]
        [--hlo-dir DIR] [--fusion-autotuner off|on]

The program is the one the trainer runs: `crckd_jax.builder.build_run` (the call
`Trainer.build` makes), compiled through its `DataParallel` for the target's devices.
Targets `h100` and `h200` need the CUDA plugin (`pip install ".[cuda13]"`, about 4 GB of
wheels; no GPU or driver): XLA compiles for the GPU described by the target's device info,
without autotuning (kernel choices may differ somewhat from a real device; fusions and
buffers are XLA's). XLA's fusion autotuner is off by default here (`--fusion-autotuner`):
without a device it compiles every fusion's candidates and keeps XLA's defaults, so the
program is the same instruction for instruction, compiled in half the time. `cpu` compiles
for this machine (a check of the report itself).
`--folds K` compiles the train step of K folds trained side by side as one program, as
`parallel.folds_side_by_side=K` trains them (`Run.folds_train_step`: the step `jax.vmap`ped
over states and class weights stacked on a leading fold axis and the K folds' batches);
`--fold-axis-size G` splits them over G groups of the devices (`parallel.fold_axis_size`).

Per program: kernels per step by kind, bytes moved per step (XLA's cost analysis where it
answers, else operands plus results of every kernel, an upper bound; the line says which),
beside it the tighter estimate with the operands a fusion only slices counted as far as it
reads them (`hlo_report`), kernels by phase (differentiated forward pass, backward pass, no
gradient; by top-level module), temporaries, the floor time of the bytes at the target's memory
bandwidth, the compile time. The last line per program: `RESULT target=<t> program=<p>
folds=<k> kernels=<n> hbm_gib=<x> sliced_gib=<x> temp_gib=<y> floor_ms=<z> compile_s=<s>` (and more
fields)
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
    """An accelerator to compile for. platform: 'cuda', 'tpu' or 'cpu'; topology: the
    plugin's topology name; bandwidth: memory bytes/s per chip; memory: bytes per chip;
    link: bytes/s per chip between chips (one direction; 0 for one chip); flops: dense
    bfloat16 FLOP/s per chip (0: unknown), as published."""

    name: str
    platform: str
    topology: str
    bandwidth: float
    memory: float
    link: float = 0.0
    flops: float = 0.0


_GIB = 2**30
_H100_BF16 = 989e12  # H100 and H200 SXM: dense bfloat16 tensor-core peak
TARGETS = {
    "h100": Target("NVIDIA H100 80GB HBM3", "cuda", "1x1x1", 3.35232e12, 84_929_347_584,
                   flops=_H100_BF16),
    "h200": Target("NVIDIA H200", "cuda", "1x1x1", 4.8e12, 150_000_000_000,
                   flops=_H100_BF16),
    # one node of 8 H100 (NVLink 4: 450 GB/s per GPU and direction); two such nodes, joined
    # by one 400 Gb/s NIC per GPU
    "h100x8": Target("NVIDIA H100 80GB HBM3", "cuda", "1x1x8", 3.35232e12, 84_929_347_584,
                     450e9, _H100_BF16),
    "h100x16": Target("NVIDIA H100 80GB HBM3", "cuda", "1x2x8", 3.35232e12, 84_929_347_584,
                      50e9, _H100_BF16),
    # TPU v5e-16 (4x4: 16 chips, 4 hosts): 819 GB/s HBM, 16 GiB, ICI 1,600 Gb/s per chip,
    # 197 bf16 TFLOP/s; v5p-8 (2x2x1: 4 chips): 2,765 GB/s, 95 GiB, ICI 4,800 Gb/s, 459
    "tpu-v5e-16": Target("TPU v5e", "tpu", "v5e:4x4", 819e9, 16 * _GIB, 200e9, 197e12),
    "tpu-v5p-8": Target("TPU v5p", "tpu", "v5p:2x2x1", 2765e9, 95 * _GIB, 600e9, 459e12),
    "cpu": Target("this machine's CPU", "cpu", "", 0.0, 0),
}
PROGRAMS = ("train_step", "eval_step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), default="h200")
    p.add_argument("--program", default="train_step",
                   help="comma-separated, of " + ", ".join(PROGRAMS))
    p.add_argument("--model", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64, help="per chip")
    p.add_argument("--parallel", choices=("shard_map", "pmap"), default="shard_map",
                   help="the data-parallel compiler (parallel.backend)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--memory", choices=("bank", "queue"), default="bank")
    p.add_argument("--num-items", type=int, default=2929, help="training items N (bank rows)")
    p.add_argument("--num-positives", type=int, default=20)
    p.add_argument("--num-negatives", type=int, default=4096)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--kernels", choices=("auto", "cpu", "standard"), default="auto",
                   help="the model's layer implementations ('auto': by the target)")
    p.add_argument("--top", type=int, default=15, help="kinds of kernels listed")
    p.add_argument("--folds", type=int, default=1,
                   help="train step: K folds side by side (parallel.folds_side_by_side)")
    p.add_argument("--fold-axis-size", type=int, default=1,
                   help="with --folds: the folds split over this many groups of the devices "
                        "(parallel.fold_axis_size); --batch-size stays per chip and fold")
    p.add_argument("--hlo-dir", default=None, help="write each optimized program here")
    p.add_argument("--fusion-autotuner", choices=("off", "on"), default="off",
                   help="GPU targets: XLA's fusion autotuner (config-assigner), which "
                        "without a device cannot measure and keeps XLA's defaults: the "
                        "program is the same either way, 'on' compiles 2-3 minutes longer "
                        "on 2 cores (docs/performance.md)")
    args = p.parse_args(argv)
    if args.folds < 1:
        p.error("--folds takes a positive count")
    if args.fold_axis_size < 1 or args.folds % args.fold_axis_size:
        p.error("--fold-axis-size takes a divisor of --folds")
    args.programs = [x.strip() for x in args.program.split(",") if x.strip()]
    unknown = [x for x in args.programs if x not in PROGRAMS]
    if unknown:
        p.error(f"unknown program(s) {unknown}: expected some of {', '.join(PROGRAMS)}")
    return args


def target_devices(target: Target):
    """The devices to compile for: a deviceless GPU or TPU topology, or this machine's CPU."""
    import jax

    if target.platform == "cpu":
        return jax.devices("cpu")[:1]
    from jax.experimental import topologies

    try:
        if target.platform == "cuda":
            config = _GPU_INFO.format(bandwidth=int(target.bandwidth), memory=int(target.memory),
                                      name=target.name)
            topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                    topology=target.topology)
        else:
            topology = topologies.get_topology_desc(platform="tpu",
                                                    topology_name=target.topology)
    except Exception as e:  # no plugin, or one that cannot describe the target
        extra = "cuda13" if target.platform == "cuda" else "tpu"
        sys.exit(f"error: cannot describe {target.name} {target.topology} for a deviceless "
                 f'compile ({e}); install its plugin: pip install ".[{extra}]"')
    return topology.devices


def build(args, devices):
    """The run of the benchmark's settings, compiled for `devices` (the trainer's build)."""
    from crckd_jax import builder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import benchmark_settings, class_counts

    groups = args.fold_axis_size
    settings = benchmark_settings(args, batch_size=args.batch_size * len(devices) // groups,
                                  dtype=args.dtype, memory=args.memory, backend=args.parallel)
    settings = dataclasses.replace(settings, parallel=dataclasses.replace(
        settings.parallel, folds_side_by_side=args.folds, fold_axis_size=groups))
    data = builder.DataDescription.from_counts(class_counts(args.num_items))
    return builder.build_run(settings, data, kernels=args.kernels, devices=devices)


def lower(run, program: str, folds: int = 1):
    """The jitted program of `run` lowered for abstract inputs (nothing is allocated); with
    `folds` > 1 the train step of that many folds side by side (`Run.folds_train_step`)."""
    import jax

    state, batch, class_weight = run.abstract_train_inputs()
    if program == "eval_step":
        return run.eval_step[False].lower(state, {"image": batch["image"]})
    if folds == 1:
        return run.train_step.lower(state, batch, class_weight)

    layout = run.parallel.fold_sharding(folds)

    def stacked(x):  # the fold axis first (after pmap's device axis), laid out as trained
        if run.parallel.backend == "pmap":
            return jax.ShapeDtypeStruct((x.shape[0], folds, *x.shape[1:]), x.dtype)
        return jax.ShapeDtypeStruct((folds, *x.shape), x.dtype,
                                    sharding=layout or x.sharding)

    state, class_weight = jax.tree.map(stacked, (state, class_weight))
    return run.folds_train_step.lower(state, (batch,) * folds, class_weight)


def compiler_options(args, target: Target) -> dict:
    """XLA options of the report's compiles: on GPU targets, the fusion autotuner as
    --fusion-autotuner says (XLA's default: on)."""
    if target.platform != "cuda" or args.fusion_autotuner == "on":
        return {}
    return {"xla_gpu_experimental_enable_fusion_autotuner": False}


def report(args, target: Target, run, program: str) -> dict:
    """Compiles `program` and prints its kernels, bytes, collectives and RESULT line."""
    import hlo_report

    lowered = lower(run, program, args.folds if program == "train_step" else 1)
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options(args, target))
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
    size = lambda name: getattr(memory, f"{name}_size_in_bytes", 0) if memory else 0  # noqa
    temp, per_chip = size("temp"), size("argument") + size("temp") + size("output")
    n = run.parallel.num_devices
    # Ring collectives: an all-reduce sends 2 (n - 1) / n of its bytes per chip, an
    # all-gather (n - 1) / n of its result; at the target's link rate, without overlap.
    link_bytes = (2 * stats.collective_bytes_by_kind.get("all-reduce", 0)
                  + stats.collective_bytes_by_kind.get("all-gather", 0)) * (n - 1) / n
    link_ms = link_bytes / target.link * 1e3 if target.link and n > 1 else 0.0
    hbm_ms = hbm / target.bandwidth * 1e3 if target.bandwidth else float("nan")
    flop = cost.get("flops") or 0.0  # XLA's count per chip and step, where it answers
    compute_ms = flop / target.flops * 1e3 if flop and target.flops else 0.0
    floor_ms = max(hbm_ms, link_ms, compute_ms)
    allreduce = stats.collective_bytes_by_kind.get("all-reduce", 0)
    folds = args.folds if program == "train_step" else 1
    groups = run.parallel.fold_groups if run.parallel.folds_split(folds) else 1
    side = (f" of {folds} folds side by side" + (f" in {groups} fold groups" if groups > 1
                                                 else "")) if folds > 1 else ""
    print(f"\n{program}{side} for "
          f"{target.name} {target.topology} ({n} chips, "
          f"{args.parallel}): {stats.num_kernels} kernels per step, {hbm / _GIB:.2f} GiB "
          f"moved per chip ({estimator}; {stats.sliced_bytes / _GIB:.2f} GiB with sliced "
          f"operands counted as read), {temp / _GIB:.2f} GiB of temporaries, "
          f"{per_chip / _GIB:.2f} GiB per chip (arguments, temporaries, outputs), compiled "
          f"in {compile_s:.1f} s; floor {floor_ms:.1f} ms (memory {hbm_ms:.1f} ms, links "
          f"{link_ms:.1f} ms, arithmetic {compute_ms:.1f} ms"
          + (f": {flop / 1e12:.2f} TFLOP per chip by XLA's cost analysis" if flop else "")
          + ")")
    for kind, count in stats.kernels.most_common(args.top):
        print(f"  {count:6d}  {kind}")
    print("  by phase (op names): " + ", ".join(
        f"{phase} {count}" for phase, count in stats.kernels_by_phase.most_common()))
    for kind, count in stats.collectives.items():
        print(f"  collective {kind}: {count} ops, "
              f"{stats.collective_bytes_by_kind[kind] / _GIB:.3f} GiB per chip")
    result = {"target": args.target, "program": program, "folds": folds, "compiled": 1,
              "kernels": stats.num_kernels, "hbm_gib": hbm / _GIB,
              "sliced_gib": stats.sliced_bytes / _GIB, "temp_gib": temp / _GIB,
              "per_chip_gib": per_chip / _GIB, "collectives": sum(stats.collectives.values()),
              "allreduce_gib": allreduce / _GIB,
              "allgather_gib": stats.collective_bytes_by_kind.get("all-gather", 0) / _GIB,
              "tflop": flop / 1e12, "compute_ms": compute_ms, "floor_ms": floor_ms,
              "compile_s": compile_s, "kernels_by_phase": dict(stats.kernels_by_phase)}
    print(f"RESULT target={args.target} program={program} folds={folds} compiled=1 "
          f"kernels={stats.num_kernels} hbm_gib={hbm / _GIB:.2f} "
          f"sliced_gib={stats.sliced_bytes / _GIB:.2f} temp_gib={temp / _GIB:.2f} "
          f"per_chip_gib={per_chip / _GIB:.2f} collectives={result['collectives']} "
          f"allreduce_gib={allreduce / _GIB:.3f} tflop={flop / 1e12:.2f} "
          f"compute_ms={compute_ms:.1f} floor_ms={floor_ms:.1f} "
          f"compile_s={compile_s:.0f}", flush=True)
    return result


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    target = TARGETS[args.target]
    if target.platform == "cuda":  # before JAX starts: the plugin's topology without a GPU
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from crckd_jax.models.kernels import resolve_kernels

    devices = target_devices(target)
    run = build(args, devices)
    layers = resolve_kernels(args.kernels, devices[0].platform)
    print(f"{args.model}, {args.image_size} px, {args.batch_size} per chip x {len(devices)} "
          f"chips, {args.dtype}, {layers} layers, {args.memory} memory, "
          f"P = {args.num_positives}, K = {args.num_negatives}; for {target.name} "
          f"{target.topology}" + (f", fusion autotuner {args.fusion_autotuner}"
                                  if target.platform == "cuda" else ""), flush=True)
    return [report(args, target, run, program) for program in args.programs]


if __name__ == "__main__":
    main()
