"""Images/s of the compiled CRCKD train step, optionally against the reference in PyTorch.

    python benchmarks/step_time.py [--model densenet121] [--image-size 224] [--batch-size 8]
        [--memory bank|queue] [--dtype float32|bfloat16] [--steps 3] [--rounds 3] [--warmup 2]
        [--compare-torch [--torch-python PATH] [--torch-amp] [--torch-channels-last]]
        [--xla-options default|none] [--profile DIR]

Times `crckd_jax.step.train_step` (student forward and backward, teacher forward, memory
sampling, scoring and update, the four losses, Adam + OneCycle, the EMA) compiled with
`jax.jit` and the state donated, at the paper's P = 20, K = 4096, d = 128 and, for the
bank, N = 2929 items (the APTOS fold size), 5 classes with APTOS proportions. Batches are
generated with numpy from --seed, placed on the device before timing, and used in turn.
Reported: tracing and compile time (apart), the median step time over --rounds x --steps
timed steps after --warmup steps, images/s = batch / median, and peak memory.

With --compare-torch, `benchmarks/torch_reference.py` runs next, in a subprocess with
--torch-python (default: this interpreter if it imports torch), on the same batches (an
.npz file): the reference computation in PyTorch (torchvision DenseNet student and EMA
teacher with the CRCKD head, the bank memory, the same losses, Adam + OneCycleLR, the EMA).
Both sides use the same thread count (--threads, default: all cores of this process). The
torch process warms up while JAX compiles, then the two are timed in interleaved rounds
(--steps JAX steps, then --steps torch steps, --rounds times), so that both see the same
machine load; per-round ratios are printed as well.

The last line is `RESULT jax_img_s=<x>`, or with --compare-torch
`RESULT jax_img_s=<x> torch_img_s=<y> ratio=<x/y>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# APTOS 2019 class counts (1805, 370, 999, 193, 295) scaled to the fold size 2929.
APTOS_FOLD_COUNTS = (1444, 296, 799, 154, 236)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--memory", choices=("queue", "bank"), default="bank")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the backbone (parameters stay float32)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of --steps JAX steps then --steps torch steps (interleaved, "
                        "so both sides see the same machine load)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--num-positives", type=int, default=20)
    p.add_argument("--num-negatives", type=int, default=4096)
    p.add_argument("--num-items", type=int, default=sum(APTOS_FOLD_COUNTS),
                   help="training items N (bank rows); classes keep APTOS proportions")
    p.add_argument("--queue-capacity", type=int, default=None,
                   help="queue memory: rows per class (default N / 5, as many rows as the bank)")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distinct-batches", type=int, default=4,
                   help="batches generated and used in turn")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides (default: the cores this process may use)")
    p.add_argument("--xla-options", choices=("default", "none"), default="default",
                   help="'default': crckd_jax.xla_options; 'none': XLA's own defaults")
    p.add_argument("--profile", default=None,
                   help="directory: trace 2 extra steps with jax.profiler and print the ops "
                        "that take the most time")
    p.add_argument("--skip-jax", action="store_true", help="run only the torch side")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--torch-python", default=None,
                   help="interpreter that imports torch and torchvision (default: this one)")
    p.add_argument("--torch-amp", action="store_true",
                   help="torch side under autocast (float16 + GradScaler on CUDA, bfloat16 "
                        "on CPU)")
    p.add_argument("--torch-channels-last", action="store_true",
                   help="torch side in channels_last memory format")
    p.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    return p.parse_args(argv)


def class_counts(num_items: int) -> list[int]:
    """APTOS fold proportions scaled to num_items (every class at least one item)."""
    total = sum(APTOS_FOLD_COUNTS)
    counts = [max(1, round(c * num_items / total)) for c in APTOS_FOLD_COUNTS]
    counts[0] += num_items - sum(counts)
    return counts


def make_inputs(args):
    """Training labels [N] and `distinct_batches` batches of numpy arrays (NHWC images)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    counts = class_counts(args.num_items)
    train_labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)
    batches = []
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    for _ in range(args.distinct_batches):
        index = rng.choice(args.num_items, args.batch_size, replace=False).astype(np.int32)
        batches.append({
            "image_student": rng.standard_normal(shape, np.float32),
            "image_teacher": rng.standard_normal(shape, np.float32),
            "label": train_labels[index],
            "index": index,
        })
    return train_labels, batches


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarise_profile(trace_dir: str, steps: int, top: int = 25):
    """Thread time per step of the XLA ops in a jax.profiler trace, grouped by kind.

    Returns (total ms per step, [(op kind, ms per step, share of the total, calls per
    step)]). An op kind is the op's name without its numeric suffixes (all `fusion.N`
    together, all oneDNN convolutions together, ...). CPU: the events of XLA's worker
    threads, summed over threads; GPU: the kernels on the device planes.
    """
    import glob
    import re
    from collections import defaultdict

    from jax._src.lib import _profile_data

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        return 0.0, []
    data = _profile_data.ProfileData.from_file(files[-1])
    totals, calls = defaultdict(float), defaultdict(int)
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in device_planes or data.planes:
        for line in plane.lines:
            if not device_planes and "XLAEigen" not in line.name:
                continue  # CPU: only XLA's worker threads run ops
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "$")):
                    continue
                kind = re.sub(r"(\.\d+)+", "", event.name).replace(".clone", "")
                totals[kind] += event.duration_ns / 1e6 / steps
                calls[kind] += 1
    total = sum(totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return total, [(k, v, v / total, calls[k] / steps) for k, v in rows]


def setup_jax(args, train_labels, np_batches):
    """Builds, compiles and warms up the JAX step: (info, run(n) -> step times, finish())."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from crckd_jax import losses
    from crckd_jax.distillation import ContrastConfig
    from crckd_jax.memory import BankMemory, QueueMemory
    from crckd_jax.models.densenet import CRCKDNet, densenet_config
    from crckd_jax.objective import LossConfig
    from crckd_jax.optim import make_optimizer
    from crckd_jax.state import create_train_state
    from crckd_jax.step import StepConfig, make_train_step

    num_classes = len(APTOS_FOLD_COUNTS)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = CRCKDNet(densenet_config(args.model), num_classes, hidden_dim=128, dtype=dtype)
    optimizer = make_optimizer(total_steps=10_000)
    if args.memory == "bank":
        make_memory = lambda key: BankMemory.create(key, train_labels, num_classes,
                                                    args.embed_dim)
    else:
        capacity = args.queue_capacity or max(1, args.num_items // num_classes)
        make_memory = lambda key: QueueMemory.create(key, num_classes, capacity,
                                                     args.embed_dim)
    config = StepConfig(
        loss=LossConfig.from_preset("paper"),
        contrast=ContrastConfig(num_positives=args.num_positives,
                                num_negatives=args.num_negatives),
        embed_dim=args.embed_dim, steps_per_epoch=1000,
        consistency_divisor=float(args.batch_size))
    class_weight = losses.class_weights(np.bincount(train_labels, minlength=num_classes))
    step = jax.jit(make_train_step(model, optimizer, class_weight, config),
                   donate_argnums=(0,))

    t0 = time.perf_counter()
    state = create_train_state(jax.random.key(args.seed), model, optimizer, make_memory,
                               (args.image_size, args.image_size, 3), args.embed_dim)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    batches = [jax.device_put(b) for b in np_batches]
    jax.block_until_ready(batches)

    t0 = time.perf_counter()
    lowered = step.lower(state, batches[0])
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    memory = {}
    try:
        analysis = compiled.memory_analysis()
        memory = {k: getattr(analysis, f"{k}_size_in_bytes") / 2**20
                  for k in ("argument", "output", "temp", "generated_code")}
    except Exception:  # not every backend reports it
        pass
    state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    rows_bytes = sum(x.nbytes for x in (state.memory.student, state.memory.teacher))
    memory_rows_mb = rows_bytes / 2**20
    if args.memory == "bank":  # exactly N x d x 2 float32 (student and teacher rows)
        assert rows_bytes == args.num_items * args.embed_dim * 2 * 4, rows_bytes
    else:  # 2 x C x Q x d float32, whatever the data set size
        assert rows_bytes == 2 * num_classes * state.memory.student.shape[1] * \
            args.embed_dim * 4, rows_bytes

    progress = {"done": 0, "loss": float("nan")}

    def run(num_steps):
        nonlocal state
        times = []
        if num_steps == 0:
            return times
        for _ in range(num_steps):
            batch = batches[progress["done"] % len(batches)]
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            progress["done"] += 1
        progress["loss"] = float(metrics["loss"])
        if not np.isfinite(progress["loss"]):
            raise RuntimeError(f"non-finite loss {progress['loss']}")
        return times

    run(args.warmup)

    def finish():
        profile = (0.0, [])
        if args.profile:
            with jax.profiler.trace(args.profile):
                run(2)
            profile = summarise_profile(args.profile, steps=2)
        stats = jax.devices()[0].memory_stats() or {}
        return {
            "loss": progress["loss"],
            "device_peak_mb": stats.get("peak_bytes_in_use", float("nan") * 2**20) / 2**20,
            "host_peak_mb": peak_host_mb(),
            "profile": profile,
        }

    info = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "init_s": init_s, "trace_s": trace_s, "compile_s": compile_s,
        "state_mb": state_mb, "memory_rows_mb": memory_rows_mb,
        "executable_mb": memory,
    }
    return info, run, finish


def torch_python(args) -> str | None:
    if args.torch_python:
        return args.torch_python
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        return sys.executable
    except ImportError:
        return None


class TorchServer:
    """benchmarks/torch_reference.py --serve in a subprocess, fed the same batches."""

    def __init__(self, args, train_labels, np_batches, threads, python):
        import numpy as np

        self.tmp = tempfile.TemporaryDirectory()
        npz = os.path.join(self.tmp.name, "inputs.npz")
        arrays = {"train_labels": train_labels}
        for i, b in enumerate(np_batches):
            arrays.update({f"{k}_{i}": v for k, v in b.items()})
        np.savez(npz, **arrays)
        cmd = [python, os.path.join(ROOT, "benchmarks", "torch_reference.py"),
               "--inputs", npz, "--serve", "--model", args.model,
               "--warmup", str(args.warmup),
               "--num-positives", str(args.num_positives),
               "--num-negatives", str(args.num_negatives),
               "--embed-dim", str(args.embed_dim), "--seed", str(args.seed),
               "--threads", str(threads)]
        if args.torch_amp:
            cmd.append("--amp")
        if args.torch_channels_last:
            cmd.append("--channels-last")
        if args.torch_device:
            cmd += ["--device", args.torch_device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = None

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch side failed (exit {self.proc.wait()}); see its stderr")
        return json.loads(line)

    def ready(self) -> dict:
        if self.info is None:
            self.info = self._reply()["ready"]
        return self.info

    def run(self, num_steps: int) -> tuple[list[float], float]:
        self.ready()
        self.proc.stdin.write(f"run {num_steps}\n")
        self.proc.stdin.flush()
        reply = self._reply()
        return reply["step_s"], reply["loss"]

    def finish(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        memory = self._reply()["memory"]
        self.proc.wait()
        self.tmp.cleanup()
        return memory


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.xla_options == "default":
        from crckd_jax import xla_options
        xla_options.configure()
    else:
        os.environ["CRCKD_XLA_OPTIONS"] = "none"
    if args.threads:
        # Eigen/oneDNN pools of XLA CPU size themselves from the affinity mask.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])

    train_labels, np_batches = make_inputs(args)
    load_before = os.getloadavg()
    print(f"# {args.model} {args.image_size}px batch {args.batch_size} memory={args.memory} "
          f"dtype={args.dtype} P={args.num_positives} K={args.num_negatives} "
          f"N={args.num_items} threads={threads}", flush=True)
    result = {"args": vars(args)}
    torch_server = None
    if args.compare_torch:
        python = torch_python(args)
        if python is None:
            print("torch comparison skipped: this interpreter cannot import torch and "
                  "torchvision; pass --torch-python /path/to/python (see "
                  "docs/performance.md)", file=sys.stderr)
        else:
            # Starts (and warms up) while JAX compiles; timing starts when both are ready.
            torch_server = TorchServer(args, train_labels, np_batches, threads, python)
    jax_run = None
    if not args.skip_jax:
        info, jax_run, jax_finish = setup_jax(args, train_labels, np_batches)
        result["jax"] = info
        print(f"jax   {info['device']} ({info['backend']}, jax {info['jax']}): "
              f"init {info['init_s']:.1f} s, trace {info['trace_s']:.1f} s, "
              f"compile {info['compile_s']:.1f} s", flush=True)
    if torch_server is not None:
        tinfo = torch_server.ready()
        result["torch"] = tinfo
        print(f"torch {tinfo['device']} (torch {tinfo['torch']}, {tinfo['mode']})", flush=True)

    # Interleaved rounds: JAX steps, then torch steps, --rounds times.
    jax_times, torch_times, ratios = [], [], []
    torch_loss = float("nan")
    for r in range(args.rounds):
        jt = jax_run(args.steps) if jax_run else []
        tt = []
        if torch_server is not None:
            tt, torch_loss = torch_server.run(args.steps)
        jax_times += jt
        torch_times += tt
        msg = f"round {r + 1}/{args.rounds}:"
        if jt:
            msg += " jax " + " ".join(f"{t:.3f}" for t in jt) + " s"
        if tt:
            msg += "  torch " + " ".join(f"{t:.3f}" for t in tt) + " s"
        if jt and tt:
            ratios.append(statistics.median(tt) / statistics.median(jt))
            msg += f"  ratio {ratios[-1]:.3f}"
        print(msg, flush=True)

    load_after = os.getloadavg()
    result["loadavg"] = [load_before, load_after]
    print(f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} "
          f"{load_before[2]:.1f}, after {load_after[0]:.1f} {load_after[1]:.1f} "
          f"{load_after[2]:.1f} on {os.cpu_count()} cores", flush=True)
    if max(load_before[0], load_after[0]) > threads + 0.5:
        print("WARNING: other processes loaded the machine during the run; CPU timings "
              "(torch's OpenMP pool above all) are then not representative", flush=True)
    line = "RESULT"
    if jax_run:
        res = result["jax"]
        res.update(jax_finish())
        res["step_s"] = jax_times
        res["median_step_s"] = statistics.median(jax_times)
        res["img_s"] = args.batch_size / res["median_step_s"]
        ex = res["executable_mb"]
        print(f"jax   median {res['median_step_s']:.3f} s = {res['img_s']:.2f} img/s, loss "
              f"{res['loss']:.4f}; host peak RSS {res['host_peak_mb']:.0f} MB, state "
              f"{res['state_mb']:.0f} MB (class memory rows {res['memory_rows_mb']:.2f} MB), "
              f"executable temp {ex.get('temp', float('nan')):.0f} MB, device peak "
              f"{res['device_peak_mb']:.0f} MB", flush=True)
        total, rows = res["profile"]
        if rows:
            print(f"profile: {total:.0f} ms of op time per step (summed over threads), "
                  f"by op kind:")
        for name, ms, share, calls in rows:
            print(f"prof  {ms:8.1f} ms/step {100 * share:5.1f}% {calls:6.0f} calls/step  "
                  f"{name[:120]}")
        line += f" jax_img_s={res['img_s']:.3f}"
    if torch_server is not None:
        res = result["torch"]
        res.update(torch_server.finish())
        res["step_s"] = torch_times
        res["loss"] = torch_loss
        res["median_step_s"] = statistics.median(torch_times)
        res["img_s"] = args.batch_size / res["median_step_s"]
        print(f"torch median {res['median_step_s']:.3f} s = {res['img_s']:.2f} img/s, loss "
              f"{res['loss']:.4f}; host peak RSS {res['host_peak_mb']:.0f} MB, device peak "
              f"{res['device_peak_mb'] or float('nan'):.0f} MB", flush=True)
        line += f" torch_img_s={res['img_s']:.3f}"
        if jax_run:
            ratio = result["jax"]["img_s"] / res["img_s"]
            result["ratio"] = ratio
            result["round_ratios"] = ratios
            print(f"ratio of medians {ratio:.3f}; per-round ratios "
                  + " ".join(f"{x:.3f}" for x in ratios), flush=True)
            line += f" ratio={ratio:.3f}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(line, flush=True)

if __name__ == "__main__":
    main()
