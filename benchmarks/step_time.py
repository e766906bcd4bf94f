"""Images/s of the compiled CRCKD train step, optionally against the reference in PyTorch.

    python benchmarks/step_time.py [--model densenet121] [--image-size 224] [--batch-size 8]
        [--memory bank|queue] [--dtype float32|bfloat16] [--kernels auto|cpu|standard]
        [--xla-options default|none] [--steps 3] [--rounds 3] [--warmup 2]
        [--compare-torch [--torch-python PATH] [--torch-amp] [--torch-channels-last]]
        [--compare-authors REPO [--torch-python PATH]]
        [--variants 'KEY=VALUE,...;KEY=VALUE,...' [--schedule interleaved|sequential]]
        [--profile DIR] [--compilation-cache DIR] [--json FILE]

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

With --compare-authors REPO (a checkout of github.com/hathawayxxh/CRCKD), the authors' own
training iteration joins the rounds the same way, on the same batches
(`benchmarks/authors_iteration.py`: their `train_CRCKD.py` run unchanged on the CPU, its
loop body timed) for every variant with the bank memory in float32 (their setting).

Variants. --variants times several settings in one process, e.g.
`--variants 'xla=default;xla=onednn'` (the XLA options of `crckd_jax.xla_options` against
its oneDNN choice, the same step compiled twice) or
`--variants 'batch=64,dtype=bfloat16,torch=amp;batch=64,memory=queue,torch=off'`. Keys:
batch, dtype, memory, augment (host: the views made beforehand, the step alone; device: uint8
images and both views made inside the step, as the trainer runs it), kernels (the model's
layer implementations, `crckd_jax.models.kernels`),
xla (default|none|onednn: the compiler options of `crckd_jax.xla_options` for that
CRCKD_XLA_OPTIONS choice, given to this variant's executable; default: the environment's
choice), torch
(float32|amp|off: its torch partner; default with --compare-torch: --torch-amp's choice for
bank variants, off for queue variants, which torch does not implement). Unset keys take the
flags' values. --schedule interleaved (default) compiles every variant first and then times
rounds of all of them in turn (fair on a loaded machine); sequential compiles and times one
variant after the other and writes --json after each, so a time limit keeps the finished
ones (for a dedicated accelerator). Torch partners are shared by variants with the same
batch and torch mode.

The last line is `RESULT jax_img_s=<x>`, or with --compare-torch
`RESULT jax_img_s=<x> torch_img_s=<y> ratio=<x/y>`, with --compare-authors also
`authors_img_s=<z> ratio_authors=<x/z>`; with several variants, one line
`RESULT variant=<label> ...` per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

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
    p.add_argument("--augment", choices=("host", "device"), default="host",
                   help="host: the batches carry the two views, made beforehand (the step "
                        "alone); device: uint8 images, both views made inside the step "
                        "(crckd_jax.augment), as the trainer runs it")
    p.add_argument("--kernels", choices=("auto", "cpu", "standard"), default="auto",
                   help="the model's layer implementations (crckd_jax.models.kernels)")
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
    p.add_argument("--xla-options", choices=("default", "none", "onednn"), default="default",
                   help="compiler options of crckd_jax.xla_options: 'default' (the "
                        "CRCKD_XLA_OPTIONS choice of the environment, XLA's defaults if "
                        "unset), 'none' (XLA's defaults), 'onednn' (oneDNN convolutions and "
                        "dots on the CPU)")
    p.add_argument("--variants", default=None,
                   help="';'-separated variants, each ','-separated KEY=VALUE (keys: batch, "
                        "dtype, memory, augment, kernels, xla, torch); see the module "
                        "docstring")
    p.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved")
    p.add_argument("--profile", default=None,
                   help="directory: trace 2 extra steps of the first variant with "
                        "jax.profiler and print the ops that take the most time")
    p.add_argument("--compilation-cache", default=None,
                   help="directory of JAX's persistent compilation cache (default: off)")
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
    p.add_argument("--compare-authors", default=None, metavar="REPO",
                   help="checkout of github.com/hathawayxxh/CRCKD: time the authors' own "
                        "iteration too (bank float32 variants; in --torch-python)")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed setting of the JAX step and its torch partner ('off': none)."""

    batch_size: int
    dtype: str
    memory: str
    augment: str
    kernels: str
    xla: str
    torch: str

    @property
    def label(self) -> str:
        return (f"b{self.batch_size}-{self.dtype}-{self.memory}-aug_{self.augment}"
                f"-kernels_{self.kernels}-xla_{self.xla}")


_VARIANT_KEYS = {"batch": "batch_size", "dtype": "dtype", "memory": "memory",
                 "augment": "augment", "kernels": "kernels", "xla": "xla", "torch": "torch"}
_VARIANT_CHOICES = {"dtype": ("float32", "bfloat16"), "memory": ("bank", "queue"),
                    "augment": ("host", "device"),
                    "kernels": ("auto", "cpu", "standard"), "xla": ("default", "none", "onednn"),
                    "torch": ("float32", "amp", "off")}


def parse_variants(args) -> list[Variant]:
    """The variants of --variants (one from the plain flags without it)."""
    default_torch = "amp" if args.torch_amp else "float32"
    base = dict(batch_size=args.batch_size, dtype=args.dtype, memory=args.memory,
                augment=args.augment, kernels=args.kernels, xla=args.xla_options, torch=None)
    specs = [s for s in (args.variants or "").split(";") if s.strip()] or [""]
    variants = []
    for spec in specs:
        fields = dict(base)
        for item in (i for i in spec.split(",") if i.strip()):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in _VARIANT_KEYS:
                raise SystemExit(f"error: bad variant item {item!r} in {spec!r}; expected "
                                 f"KEY=VALUE with KEY in {sorted(_VARIANT_KEYS)}")
            if key in _VARIANT_CHOICES and value not in _VARIANT_CHOICES[key]:
                raise SystemExit(f"error: variant {key}={value!r}: expected one of "
                                 f"{_VARIANT_CHOICES[key]}")
            fields[_VARIANT_KEYS[key]] = int(value) if key == "batch" else value
        if fields["torch"] is None:
            fields["torch"] = (default_torch if args.compare_torch and fields["memory"] == "bank"
                               else "off")
        if fields["torch"] != "off" and fields["memory"] != "bank":
            raise SystemExit("error: the torch reference implements only the bank memory; "
                             f"set torch=off for {spec!r}")
        variant = Variant(**fields)
        if variant in variants:
            raise SystemExit(f"error: variant {spec!r} repeats {variant.label}")
        variants.append(variant)
    return variants


def class_counts(num_items: int) -> list[int]:
    """APTOS fold proportions scaled to num_items (every class at least one item)."""
    total = sum(APTOS_FOLD_COUNTS)
    counts = [max(1, round(c * num_items / total)) for c in APTOS_FOLD_COUNTS]
    counts[0] += num_items - sum(counts)
    return counts


def make_inputs(args, batch_size: int):
    """Training labels [N] and `distinct_batches` batches of numpy arrays: both views
    (float32 NHWC, for the host-augmentation variants and torch) and the uint8 image they
    would come from (for the device-augmentation variants)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    counts = class_counts(args.num_items)
    train_labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)
    batches = []
    shape = (batch_size, args.image_size, args.image_size, 3)
    for _ in range(args.distinct_batches):
        index = rng.choice(args.num_items, batch_size, replace=False).astype(np.int32)
        batches.append({
            "image_student": rng.standard_normal(shape, np.float32),
            "image_teacher": rng.standard_normal(shape, np.float32),
            "image": rng.integers(0, 256, shape, np.uint8),
            "label": train_labels[index],
            "index": index,
        })
    return train_labels, batches


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# Lines of a device plane that are summaries of other lines, not kernels.
_DERIVED_LINES = ("XLA Modules", "XLA TraceMe", "Steps", "Framework Name Scope",
                  "Framework Ops", "TensorFlow Name Scope", "TensorFlow Ops", "Source code",
                  "Launch Stats", "XLA Ops")


def _op_kind(name: str) -> str:
    """An op's kind: its name without numeric suffixes (`fusion.12` and `fusion.3` ->
    `fusion`, `loop_add_fusion_2` -> `loop_add_fusion`), templates of kernel names cut."""
    import re

    name = name.split("<", 1)[0].replace(".clone", "")
    name = re.sub(r"\.\d+", "", name)  # custom-call.6__onednn$convolution, fusion.12
    return re.sub(r"_\d+$", "", name).strip() or "?"  # loop_add_fusion_2


def summarise_profile(trace_dir: str, steps: int, top: int = 25):
    """Time per step of the XLA ops in the newest jax.profiler trace under `trace_dir`
    (see `summarise_xspace`)."""
    import glob

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        return 0.0, [], "no trace file"
    with warnings.catch_warnings():  # nanobind's DeprecationWarning on its types
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax._src.lib import _profile_data

        return summarise_xspace(_profile_data.ProfileData.from_file(files[-1]), steps, top)


def summarise_xspace(data, steps: int, top: int = 25):
    """Time per step of the XLA ops in a profile (a `ProfileData`), grouped by kind.

    Returns (total ms per step, [(op kind, ms per step, share of the total, calls per step)],
    source), where source says which events were counted. An op kind is the op's name
    without its numeric suffixes (all `fusion.N` together, all oneDNN convolutions together,
    ...). GPU/TPU (planes `/device:...`): the kernels on the device's stream lines (the
    `XLA Ops` line instead when the trace has one, not both: it summarises the same
    kernels), named by their `hlo_op` statistic when present, else by kernel name. CPU: the
    host events that carry an `hlo_op` statistic (XLA's thunks, on whatever thread ran
    them, control-flow thunks left out as their bodies' ops count themselves), summed over
    threads; traces without it fall back to the events of the `XLAEigen` threads.
    """
    from collections import defaultdict

    totals, calls = defaultdict(float), defaultdict(int)

    def add(name, duration_ns):
        kind = _op_kind(name)
        totals[kind] += duration_ns / 1e6 / steps
        calls[kind] += 1

    def hlo_op(event):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(event.stats).get("hlo_op")
        except Exception:  # stats of unexpected types
            return None

    planes = list(data.planes)
    device_planes = [p for p in planes if p.name.startswith("/device:")
                     and not p.name.startswith("/device:CUSTOM")]
    source = ""
    for plane in device_planes:
        lines = list(plane.lines)
        xla_ops = [line for line in lines if line.name == "XLA Ops"]
        chosen = xla_ops or [line for line in lines if line.name not in _DERIVED_LINES]
        for line in chosen:
            for event in line.events:
                add(hlo_op(event) or event.name, event.duration_ns)
        source = "device " + ("XLA Ops line" if xla_ops else "stream lines")
    if not totals:
        for plane in planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                for event in line.events:
                    op = hlo_op(event)
                    # Control-flow thunks span the ops of their bodies, counted themselves.
                    if op is not None and _op_kind(op) not in ("while", "conditional", "call"):
                        add(op, event.duration_ns)
        source = "host events with hlo_op"
    if not totals:  # older CPU runtimes: every event of XLA's worker threads
        for plane in planes:
            for line in plane.lines:
                if "XLAEigen" not in line.name:
                    continue
                for event in line.events:
                    if not event.name.startswith(("ThunkExecutor", "$", "Threadpool")):
                        add(event.name, event.duration_ns)
        source = "XLAEigen threads"
    total = sum(totals.values())
    if not total:
        return 0.0, [], "no XLA op events found"
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return total, [(k, v, v / total, calls[k] / steps) for k, v in rows], source


def benchmark_settings(args, *, batch_size: int, dtype: str, memory: str, seed: int = 0,
                       queue_capacity: int | None = None, backend: str = "shard_map"):
    """The run settings the step benchmarks build from (`step_time.py`, `deviceless.py`):
    `args`' model, image size and contrast sizes, the paper preset, 10 epochs of 1,000 steps;
    the queue memory with `queue_capacity` rows per class (default N / C, at least P)."""
    from crckd_jax.settings import Settings

    queue = queue_capacity or max(args.num_positives, args.num_items // len(APTOS_FOLD_COUNTS))
    s, r = Settings(), dataclasses.replace
    return r(
        s, seed=seed,
        data=r(s.data, image_size=args.image_size),
        model=r(s.model, name=args.model),
        train=r(s.train, batch_size=batch_size, dtype=dtype, epochs=10, steps_per_epoch=1000),
        parallel=r(s.parallel, backend=backend),
        memory=r(s.memory, kind=memory, num_positives=args.num_positives,
                 num_negatives=args.num_negatives, embed_dim=args.embed_dim,
                 queue_size=queue),
        loss=r(s.loss, preset="paper"))


def setup_jax(args, variant: Variant, train_labels, np_batches):
    """Builds, compiles and warms up the JAX step: (info, run(n) -> step times, finish())."""
    import jax
    import numpy as np

    from crckd_jax import builder, xla_options
    from crckd_jax.builder import DataDescription
    from crckd_jax.models.kernels import resolve_kernels

    num_classes = len(APTOS_FOLD_COUNTS)
    settings = benchmark_settings(args, batch_size=variant.batch_size, dtype=variant.dtype,
                                  memory=variant.memory, seed=args.seed,
                                  queue_capacity=args.queue_capacity)
    # The trainer's own build: `Trainer.build` makes the same call.
    built = builder.build_run(
        settings, DataDescription(tuple(map(str, range(num_classes))), train_labels),
        kernels=variant.kernels)
    step = built.train_step

    t0 = time.perf_counter()
    state = built.parallel.put_state(built.create_state())
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    dropped = ("image_student", "image_teacher") if variant.augment == "device" else ("image",)
    batches = [built.parallel.put_batch({k: v for k, v in b.items() if k not in dropped})
               for b in np_batches]
    jax.block_until_ready(batches)

    t0 = time.perf_counter()
    weight = built.step_class_weight
    lowered = step.lower(state, batches[0], weight)
    trace_s = time.perf_counter() - t0
    choice = None if variant.xla == "default" else {"CRCKD_XLA_OPTIONS": variant.xla}
    options = xla_options.compiler_options(environ=choice)
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
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
    if variant.memory == "bank":  # exactly N x d x 2 float32 (student and teacher rows)
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
            state, metrics = compiled(state, batch, weight)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            progress["done"] += 1
        progress["loss"] = float(metrics["loss"])
        if not np.isfinite(progress["loss"]):
            raise RuntimeError(f"non-finite loss {progress['loss']}")
        return times

    run(args.warmup)

    def finish(profile_dir=None):
        profile = (0.0, [], "")
        if profile_dir:
            try:  # a profiler that fails (no CUPTI, ...) must not lose the timings
                with jax.profiler.trace(profile_dir):
                    run(2)
                profile = summarise_profile(profile_dir, steps=2)
            except Exception as e:
                profile = (0.0, [], f"profile failed: {type(e).__name__}: {e}")
                print(profile[2], file=sys.stderr, flush=True)
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
        "kernels": resolve_kernels(variant.kernels),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": {k: str(v) for k, v in options.items()},
        "init_s": init_s, "trace_s": trace_s, "compile_s": compile_s,
        "state_mb": state_mb, "memory_rows_mb": memory_rows_mb,
        "executable_mb": memory,
    }
    return info, run, finish


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat, in clock ticks), None where there is
    none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def stolen_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of the CPU time between two `cpu_times()` that the hypervisor gave to other
    machines (steal: user nice system idle iowait irq softirq steal)."""
    if not before or not after:
        return None
    delta = [b - a for a, b in zip(before, after)]
    return delta[7] / sum(delta) if sum(delta) > 0 else None


def torch_python(args) -> str | None:
    if args.torch_python:
        return args.torch_python
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        return sys.executable
    except ImportError:
        return None


# A partner's result keys: the JAX step's ratio to it (its img/s over the partner's) and
# the per-round ratios.
PARTNER_KEYS = {"torch": ("ratio", "round_ratios"),
                "authors": ("ratio_authors", "round_ratios_authors")}


class TorchServer:
    """benchmarks/torch_reference.py (or authors_iteration.py) --serve in a subprocess,
    fed the same batches."""

    def __init__(self, args, train_labels, np_batches, threads, python, amp: bool,
                 authors_repo: str | None = None):
        import numpy as np

        self.tmp = tempfile.TemporaryDirectory()
        npz = os.path.join(self.tmp.name, "inputs.npz")
        arrays = {"train_labels": train_labels}
        for i, b in enumerate(np_batches):
            arrays.update({f"{k}_{i}": v for k, v in b.items() if k != "image"})
        np.savez(npz, **arrays)
        common = ["--inputs", npz, "--serve", "--warmup", str(args.warmup),
                  "--num-positives", str(args.num_positives),
                  "--num-negatives", str(args.num_negatives), "--seed", str(args.seed),
                  "--threads", str(threads)]
        if authors_repo:
            cmd = [python, os.path.join(ROOT, "benchmarks", "authors_iteration.py"),
                   "--repo", authors_repo, *common]
        else:
            cmd = [python, os.path.join(ROOT, "benchmarks", "torch_reference.py"), *common,
                   "--model", args.model, "--embed-dim", str(args.embed_dim)]
            if amp:
                cmd.append("--amp")
            if args.torch_channels_last:
                cmd.append("--channels-last")
            if args.torch_device:
                cmd += ["--device", args.torch_device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = None
        self.loss = float("nan")
        self.memory: dict | None = None

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch side failed (exit {self.proc.wait()}); see its stderr")
        return json.loads(line)

    def ready(self) -> dict:
        if self.info is None:
            self.info = self._reply()["ready"]
        return self.info

    def run(self, num_steps: int) -> list[float]:
        self.ready()
        self.proc.stdin.write(f"run {num_steps}\n")
        self.proc.stdin.flush()
        reply = self._reply()
        self.loss = reply["loss"]
        return reply["step_s"]

    def finish(self) -> dict:
        if self.memory is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.memory = self._reply()["memory"]
            self.proc.wait()
            self.tmp.cleanup()
        return self.memory

    def result(self, step_s: list[float], batch_size: int) -> dict:
        median = statistics.median(step_s)
        return {**self.ready(), **(self.memory or {}), "step_s": step_s, "loss": self.loss,
                "median_step_s": median, "img_s": batch_size / median}


class Runner:
    """The variants of one benchmark process, their torch partners and their results."""

    def __init__(self, args, variants: list[Variant], threads: int):
        self.args, self.variants, self.threads = args, variants, threads
        self.inputs = {}  # batch size -> (train labels, numpy batches)
        self.torch: dict[tuple[int, str], TorchServer] = {}
        self.authors: dict[int, TorchServer] = {}  # batch size -> the authors' iteration
        self.jax: dict[Variant, tuple] = {}  # variant -> (run, finish)
        self.results: dict[Variant, dict] = {v: {"label": v.label,
                                                 "spec": dataclasses.asdict(v)}
                                             for v in variants}
        self.python = None
        if any(v.torch != "off" for v in variants) or args.compare_authors:
            self.python = torch_python(args)
            if self.python is None:
                print("torch comparison skipped: this interpreter cannot import torch and "
                      "torchvision; pass --torch-python /path/to/python (see "
                      "docs/performance.md)", file=sys.stderr)

    def batches(self, batch_size):
        if batch_size not in self.inputs:
            self.inputs[batch_size] = make_inputs(self.args, batch_size)
        return self.inputs[batch_size]

    def partner(self, variant: Variant) -> TorchServer | None:
        """The variant's torch server, started on first use (it warms up while JAX
        compiles)."""
        if variant.torch == "off" or self.python is None:
            return None
        key = (variant.batch_size, variant.torch)
        if key not in self.torch:
            labels, batches = self.batches(variant.batch_size)
            self.torch[key] = TorchServer(self.args, labels, batches, self.threads,
                                          self.python, amp=variant.torch == "amp")
        return self.torch[key]

    def authors_partner(self, variant: Variant) -> TorchServer | None:
        """The authors' iteration at the variant's batch size, for bank float32 variants
        with --compare-authors (started on first use)."""
        if (not self.args.compare_authors or self.python is None
                or (variant.memory, variant.dtype) != ("bank", "float32")):
            return None
        if variant.batch_size not in self.authors:
            labels, batches = self.batches(variant.batch_size)
            self.authors[variant.batch_size] = TorchServer(
                self.args, labels, batches, self.threads, self.python, amp=False,
                authors_repo=self.args.compare_authors)
        return self.authors[variant.batch_size]

    def servers(self):
        return [*self.torch.values(), *self.authors.values()]

    def named_partners(self, variant: Variant) -> list[tuple[str, TorchServer | None]]:
        """The variant's partners by name (PARTNER_KEYS), None where it has none."""
        return [("torch", self.partner(variant)), ("authors", self.authors_partner(variant))]

    def setup(self, variant: Variant):
        if self.args.skip_jax:
            return
        labels, batches = self.batches(variant.batch_size)
        info, run, finish = setup_jax(self.args, variant, labels, batches)
        self.results[variant]["jax"] = info
        self.jax[variant] = (run, finish)
        print(f"jax   {variant.label}: {info['device']} ({info['backend']}, jax "
              f"{info['jax']}, kernels {info['kernels']}): init {info['init_s']:.1f} s, "
              f"trace {info['trace_s']:.1f} s, compile {info['compile_s']:.1f} s", flush=True)

    def rounds(self, variants: list[Variant]):
        """--rounds rounds: --steps steps of each variant, then of each torch partner."""
        partners = []
        for v in variants:
            for _, server in self.named_partners(v):
                if server is not None and server not in partners:
                    partners.append(server)
        for server in partners:
            info = server.ready()
            print(f"torch {info['device']} (torch {info['torch']}, {info['mode']}, batch "
                  f"{info['batch_size']})", flush=True)
        for r in range(self.args.rounds):
            jax_round, torch_round = {}, {}
            for v in variants:
                if v in self.jax:
                    jax_round[v] = self.jax[v][0](self.args.steps)
            for server in partners:
                torch_round[server] = server.run(self.args.steps)
            for v in variants:
                jt = jax_round.get(v, [])
                self.results[v].setdefault("jax_step_s", []).extend(jt)
                msg = f"round {r + 1}/{self.args.rounds} {v.label}:"
                if jt:
                    msg += " jax " + " ".join(f"{t:.3f}" for t in jt) + " s"
                for name, server in self.named_partners(v):
                    tt = torch_round.get(server, [])
                    self.results[v].setdefault(f"{name}_step_s", []).extend(tt)
                    if tt:
                        msg += f"  {name} " + " ".join(f"{t:.3f}" for t in tt) + " s"
                    if jt and tt:
                        ratio = statistics.median(tt) / statistics.median(jt)
                        rounds_key = PARTNER_KEYS[name][1]
                        self.results[v].setdefault(rounds_key, []).append(ratio)
                        msg += f"  ratio {ratio:.3f}"
                print(msg, flush=True)

    def collect(self, variant: Variant, profile_dir=None):
        """Final figures of one variant (its JAX side; its torch partner's so far)."""
        res = self.results[variant]
        if variant in self.jax:
            jr = res["jax"]
            jr.update(self.jax[variant][1](profile_dir))
            times = res.pop("jax_step_s", [])
            jr["step_s"] = times
            jr["median_step_s"] = statistics.median(times)
            jr["img_s"] = variant.batch_size / jr["median_step_s"]
            ex = jr["executable_mb"]
            print(f"jax   {variant.label}: median {jr['median_step_s']:.3f} s = "
                  f"{jr['img_s']:.2f} img/s, loss {jr['loss']:.4f}; host peak RSS "
                  f"{jr['host_peak_mb']:.0f} MB, state {jr['state_mb']:.0f} MB (class memory "
                  f"rows {jr['memory_rows_mb']:.2f} MB), executable temp "
                  f"{ex.get('temp', float('nan')):.0f} MB, device peak "
                  f"{jr['device_peak_mb']:.0f} MB", flush=True)
            total, rows, source = jr["profile"]
            if rows:
                print(f"profile ({source}): {total:.1f} ms of op time per step (summed over "
                      f"threads/streams), by op kind:")
            for name, ms, share, calls in rows:
                print(f"prof  {ms:8.2f} ms/step {100 * share:5.1f}% {calls:6.0f} calls/step  "
                      f"{name[:120]}")
            jr["profile"] = {"total_ms_per_step": total, "source": source,
                             "top_ops": [{"op": n, "ms_per_step": ms, "share": sh,
                                          "calls_per_step": c} for n, ms, sh, c in rows]}
        for name, server in self.named_partners(variant):
            times = res.pop(f"{name}_step_s", [])
            if server is None or not times:
                continue
            res[name] = server.result(times, variant.batch_size)
            tr = res[name]
            print(f"{name} {variant.label}: median {tr['median_step_s']:.3f} s = "
                  f"{tr['img_s']:.2f} img/s, loss {tr['loss']:.4f}; host peak RSS "
                  f"{tr.get('host_peak_mb', float('nan')):.0f} MB, device peak "
                  f"{tr.get('device_peak_mb') or float('nan'):.0f} MB", flush=True)
            if "jax" in res and "img_s" in res["jax"]:
                res[PARTNER_KEYS[name][0]] = res["jax"]["img_s"] / tr["img_s"]

    def close_partners(self, keep_keys=()):
        """Ends the torch servers except those of `keep_keys` ((batch, torch) pairs; the
        authors' iteration of a kept batch size stays up too)."""
        for key, server in self.torch.items():
            if key not in keep_keys:
                server.finish()
        kept_batches = {batch for batch, _ in keep_keys}
        for batch, server in self.authors.items():
            if batch not in kept_batches:
                server.finish()

    def result_line(self, variant: Variant, single: bool) -> str:
        res = self.results[variant]
        line = "RESULT" if single else f"RESULT variant={variant.label}"
        if "img_s" in res.get("jax", {}):
            line += f" jax_img_s={res['jax']['img_s']:.3f}"
        if "torch" in res:
            line += f" torch_img_s={res['torch']['img_s']:.3f}"
        if "ratio" in res:
            line += f" ratio={res['ratio']:.3f}"
        if "authors" in res:
            line += f" authors_img_s={res['authors']['img_s']:.3f}"
        if "ratio_authors" in res:
            line += f" ratio_authors={res['ratio_authors']:.3f}"
        return line


def main(argv=None):
    args = parse_args(argv)
    variants = parse_variants(args)
    if args.compare_authors and not os.path.isfile(
            os.path.join(args.compare_authors, "train_CRCKD.py")):
        raise SystemExit(f"error: --compare-authors {args.compare_authors}: no train_CRCKD.py "
                         "there; expected a checkout of github.com/hathawayxxh/CRCKD")
    if args.compare_authors and args.model != "densenet121":
        raise SystemExit(f"error: --compare-authors times the authors' DenseNet-121; "
                         f"--model {args.model} would compare another network")
    threads = args.threads or len(os.sched_getaffinity(0))
    # XLA compiler options are given per executable (setup_jax), so variants may differ;
    # XLA_FLAGS is left as the environment has it.
    if args.threads:
        # Eigen/oneDNN pools of XLA CPU size themselves from the affinity mask.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    load_before = os.getloadavg()
    cpu_before = cpu_times()
    print(f"# {args.model} {args.image_size}px P={args.num_positives} K={args.num_negatives} "
          f"N={args.num_items} threads={threads} schedule={args.schedule}; variants: "
          + "; ".join(f"{v.label} torch={v.torch}" for v in variants), flush=True)
    runner = Runner(args, variants, threads)
    single = len(variants) == 1

    def write_json():
        if not args.json:
            return
        result = {"args": vars(args), "loadavg": [load_before, os.getloadavg()],
                  "stolen_share": stolen_share(cpu_before, cpu_times()),
                  "variants": [runner.results[v] for v in variants]}
        first = runner.results[variants[0]]
        for key in ("jax", "torch", "ratio", "round_ratios", "authors", "ratio_authors"):
            if key in first:
                result[key] = first[key]
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.json + ".tmp", args.json)

    try:
        if args.schedule == "interleaved":
            for v in variants:
                runner.partner(v)  # torch servers warm up while JAX compiles
                runner.authors_partner(v)
            for v in variants:
                runner.setup(v)
            runner.rounds(variants)
            runner.close_partners()
            for i, v in enumerate(variants):
                runner.collect(v, args.profile if i == 0 else None)
        else:
            for i, v in enumerate(variants):
                later = {(w.batch_size, w.torch) for w in variants[i + 1:]}
                runner.partner(v)
                runner.authors_partner(v)
                runner.setup(v)
                runner.rounds([v])
                runner.close_partners(keep_keys=later)
                runner.collect(v, args.profile if i == 0 else None)
                write_json()
                print(runner.result_line(v, single), flush=True)
    finally:
        for server in runner.servers():
            if server.proc.poll() is None:
                server.proc.kill()

    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} "
          f"{load_before[2]:.1f}, after {load_after[0]:.1f} {load_after[1]:.1f} "
          f"{load_after[2]:.1f} on {os.cpu_count()} cores", flush=True)
    stolen = stolen_share(cpu_before, cpu_times())
    if stolen is not None:
        print(f"CPU time taken by the hypervisor for other machines (steal) during the run: "
              f"{100 * stolen:.1f} %", flush=True)
        if stolen > 0.05:
            print("WARNING: the virtual machine lost over 5 % of its CPU time to steal; "
                  "timings vary from step to step, trust medians over several rounds",
                  flush=True)
    if max(load_before[0], load_after[0]) > threads + 0.5:
        print("WARNING: other processes loaded the machine during the run; CPU timings "
              "(torch's OpenMP pool above all) are then not representative", flush=True)
    for v in variants:
        res = runner.results[v]
        for partner, (key, rounds) in PARTNER_KEYS.items():
            if key in res:
                print(f"{v.label}: ratio of medians against {partner} {res[key]:.3f}; "
                      "per-round ratios " + " ".join(f"{x:.3f}" for x in res.get(rounds, [])),
                      flush=True)
    if not single:
        base = runner.results[variants[0]].get("jax", {}).get("img_s")
        for v in variants[1:]:
            img_s = runner.results[v].get("jax", {}).get("img_s")
            if base and img_s:
                print(f"{v.label} vs {variants[0].label}: {img_s / base:.3f}x img/s",
                      flush=True)
    write_json()
    if args.schedule == "interleaved":
        for v in variants:
            print(runner.result_line(v, single), flush=True)


if __name__ == "__main__":
    main()
