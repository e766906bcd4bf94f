"""GPU check of crckd-jax in one call: step benchmark against torch, trainer, demo epoch.

    python benchmarks/gpu_check.py OUT_DIR [--tiny] [--budget 470] [--wheels .whl]
        [--workdir /tmp/crckd_gpu_check] [--torch-python PATH] [--parts a,b,...]

Made for a GPU machine without network (docs/performance.md, "GPU check"); `--tiny` is the
CPU dry run of the same parts with tiny settings. Every part runs in its own process with
its own time limit (and never past the overall --budget), so one failure or timeout does
not stop the others. The default parts, in this order:

  wheels     installs the wheels of --wheels (made by benchmarks/fetch_gpu_wheels.sh) whose
             distributions this interpreter lacks, into WORKDIR/site (added to PYTHONPATH)
  env        GPU name, driver, memory (nvidia-smi), Python and package versions, devices
  step_b64   benchmarks/step_time.py, DenseNet-121 at 224 px, batch 64, the views made
             beforehand (the step alone): bfloat16 vs torch AMP (with the jax.profiler
             top-ops table), then float32 vs torch float32, both with the bank memory
  loop       benchmarks/train_loop.py --real-step: the trainer's loop (input pipeline,
             device augmentation, prefetch, deferred metric reads) against the same compiled
             step alone, back to back in one process: DenseNet-121, bfloat16, batch 64,
             queue memory with P = 20, K = 4096; images/s of both and host CPU per image
  demo       one epoch of configs/demo.py, its summary.json
and, on request (--parts), after them:
  trainer    launch.py on generated 224 px images (the loop's setting, 3 x 100 steps)
  kernels    step_time.py, bfloat16 + queue at batch 64: the model's standard kernels
             against the CPU-tuned ones (crckd_jax.models.kernels) on this backend
  startup    benchmarks/startup.py: seconds to the first train step, cold and warm cache
  step_b32   as step_b64 at batch 32
  folds      benchmarks/fold_stack.py: 5 folds' train steps side by side (the program of
             `parallel.folds_side_by_side=5`) against one fold's, DenseNet-121, bfloat16,
             64 per fold, queue memory with P = 20, K = 4096; images/s of both
  autotuner  step_time.py, the step_b64 bfloat16 row twice, each in its own process with
             an empty compilation cache: with XLA's fusion autotuner (its default) and
             without (--xla_gpu_experimental_enable_fusion_autotuner=false); compile
             seconds and images/s of both
  kernel_time  step_time.py, the step_b64 bfloat16 row without XLA's command buffers
             (--xla_gpu_enable_command_buffer=), profiled: every kernel is then its own
             event, so the profile splits the device time per step by kernel kind (with
             command buffers most of it is one CUDA-graph event); images/s without CUDA graphs

On a fresh H200 the first compile of the DenseNet-121 step took over 150 s (XLA autotunes
each convolution; the autotuning results go to the persistent cache, WORKDIR/jax_cache,
which later compiles on the same machine reuse: 52 s), so the step part gets the largest
share of the default 475 s.

Writes OUT_DIR/summary.json and OUT_DIR/summary.txt (the same figures, readable), each
part's log (OUT_DIR/<part>.log, the last 200 kB) and the step benchmarks' JSON. JAX's
persistent compilation cache lives in WORKDIR/jax_cache, so a second call on the same
machine compiles less; traces and run folders stay in WORKDIR (not in OUT_DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

import startup  # benchmarks/startup.py, next to this file: its breakdown's wording

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_TAIL_BYTES = 200_000


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the parts run: the GPU settings, or the tiny ones of the CPU dry run."""

    model: str
    image_size: int
    batches: tuple[int, int]  # the two step benchmark batch sizes (large first)
    step_args: tuple[str, ...]  # --steps/--rounds/--warmup of the step benchmark
    trainer_config: str
    trainer_overrides: tuple[str, ...]
    trainer_warmup_records: int  # train records left out of the trainer's images/s
    loop_args: tuple[str, ...]  # train_loop.py --real-step flags (model, size, batch, ...)
    folds_args: tuple[str, ...]  # fold_stack.py flags
    demo_config: str
    demo_overrides: tuple[str, ...]
    limits: dict  # part -> seconds


def gpu_settings() -> Settings:
    return Settings(
        model="densenet121", image_size=224, batches=(64, 32),
        step_args=("--steps", "10", "--rounds", "3", "--warmup", "3"),
        trainer_config="configs/demo.py",
        trainer_overrides=(
            "--config.data.synthetic_image_size=224", "--config.data.image_size=224",
            "--config.data.synthetic_num_images=640", "--config.model.name=densenet121",
            "--config.train.dtype=bfloat16", "--config.train.batch_size=64",
            "--config.memory.kind=queue", "--config.memory.num_positives=20",
            "--config.memory.num_negatives=4096", "--config.memory.queue_size=585",
            "--config.train.steps_per_epoch=100", "--config.train.epochs=3",
            "--config.train.log_every_steps=20", "--config.data.worker_count=0",
            "--config.data.read_threads=16", "--config.data.build_threads=16"),
        trainer_warmup_records=2,
        loop_args=("--model", "densenet121", "--image-size", "224", "--batch-size", "64",
                   "--dtype", "bfloat16", "--steps", "100", "--log-every", "20",
                   "--num-images", "256", "--num-positives", "20", "--num-negatives", "4096",
                   "--queue-size", "585"),
        folds_args=("--model", "densenet121", "--image-size", "224", "--batch-size", "64",
                    "--folds", "5", "--dtype", "bfloat16", "--memory", "queue",
                    "--num-items", "2929", "--num-positives", "20", "--num-negatives", "4096",
                    "--steps", "5", "--rounds", "3"),
        demo_config="configs/demo.py", demo_overrides=("--config.train.epochs=1",),
        limits={"wheels": 60, "env": 60, "step_b64": 270, "loop": 130, "demo": 60,
                "trainer": 200, "kernels": 200, "startup": 200, "step_b32": 200,
                "folds": 360, "autotuner": 480, "kernel_time": 300})


def tiny_settings() -> Settings:
    return Settings(
        model="densenet_tiny", image_size=32, batches=(8, 4),
        step_args=("--steps", "2", "--rounds", "1", "--warmup", "1"),
        trainer_config="configs/demo.py:tiny",
        trainer_overrides=(
            "--config.model.name=densenet_tiny", "--config.train.dtype=bfloat16",
            "--config.train.batch_size=8", "--config.memory.kind=queue",
            "--config.train.steps_per_epoch=4", "--config.train.epochs=2",
            "--config.train.log_every_steps=2"),
        trainer_warmup_records=1,
        loop_args=("--model", "densenet_tiny", "--image-size", "32", "--batch-size", "8",
                   "--dtype", "bfloat16", "--steps", "4", "--log-every", "2",
                   "--num-images", "64"),
        folds_args=("--model", "densenet_tiny", "--image-size", "32", "--batch-size", "8",
                    "--folds", "2", "--dtype", "bfloat16", "--memory", "queue",
                    "--num-items", "64", "--num-positives", "2", "--num-negatives", "16",
                    "--steps", "2", "--rounds", "1"),
        demo_config="configs/demo.py:tiny", demo_overrides=(),
        limits={"wheels": 60, "env": 60, "step_b64": 400, "loop": 300, "demo": 300,
                "trainer": 300, "kernels": 400, "startup": 400, "step_b32": 400,
                "folds": 400, "autotuner": 400, "kernel_time": 400})


PARTS = ("wheels", "env", "step_b64", "loop", "demo", "trainer", "kernels", "startup",
         "step_b32", "folds", "autotuner", "kernel_time")
DEFAULT_PARTS = PARTS[:5]
MIN_USEFUL_S = 20  # a part with less time left than this is skipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (summary.json, summary.txt, logs)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run with tiny settings")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all parts together (default 475; --tiny 1500)")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".whl"))
    p.add_argument("--workdir", default="/tmp/crckd_gpu_check")
    p.add_argument("--python", default=sys.executable, help="interpreter of the parts")
    p.add_argument("--torch-python", default=None,
                   help="interpreter with torch + torchvision (default: --python if it "
                        "imports them; else the torch rows are skipped)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated, of {','.join(PARTS)} (run in that order; default "
                        f"{','.join(DEFAULT_PARTS)})")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- running


def run_part(cmd, log_path, limit_s, env=None, cwd=ROOT) -> dict:
    """Runs cmd in its own process group with a time limit; output (stdout + stderr) to
    log_path, cut to its last LOG_TAIL_BYTES. Returns status, rc, seconds and the child's
    CPU seconds (user + system, children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        status = "ok"
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
            if rc != 0:
                status = "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    _trim(log_path)
    return {"status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": round(limit_s),
            "child_cpu_s": round(cpu_s, 1)}


def _trim(path):
    size = os.path.getsize(path)
    if size > LOG_TAIL_BYTES:
        with open(path, "rb") as f:
            f.seek(size - LOG_TAIL_BYTES)
            tail = f.read()
        with open(path, "wb") as f:
            f.write(b"[... cut ...]\n" + tail)


def log_tail(path, lines=15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- parts


def wheel_distribution(filename: str) -> str:
    """The distribution name of a wheel file, normalised (PEP 503)."""
    import re

    return re.sub(r"[-_.]+", "-", os.path.basename(filename).split("-")[0]).lower()


def part_wheels(ctx) -> dict:
    wheels = sorted(glob.glob(os.path.join(ctx.args.wheels, "*.whl")))
    if not wheels:
        return {"status": "skipped", "note": f"no wheels in {ctx.args.wheels}"}
    # Which distributions the interpreter of the parts already has (then left alone).
    probe = subprocess.run(
        [ctx.args.python, "-c", "import importlib.metadata as m, json, re; print(json.dumps("
         "sorted({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() "
         "for d in m.distributions() if d.metadata['Name']})))"],
        capture_output=True, text=True, env=ctx.env_without_site(), timeout=60)
    present = set(json.loads(probe.stdout)) if probe.returncode == 0 else set()
    todo = [w for w in wheels if wheel_distribution(w) not in present]
    figures = {"wheels": len(wheels), "installed": [os.path.basename(w) for w in todo],
               "already_present": sorted(wheel_distribution(w) for w in wheels
                                         if w not in todo)}
    if not todo:
        return {"status": "ok", "seconds": 0.0, "figures": figures}
    shutil.rmtree(ctx.site, ignore_errors=True)
    cmd = [ctx.args.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", ctx.site, *todo]
    result = run_part(cmd, ctx.log("wheels"), ctx.limit("wheels"), env=ctx.env_without_site())
    result["figures"] = figures
    return result


ENV_SCRIPT = r"""
import importlib, importlib.metadata as md, json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(), "packages": {}}
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "flax", "optax", "orbax-checkpoint", "numpy", "torch", "torchvision", "grain",
             "tensorflow-datasets", "array-record", "ml-collections", "tensorboardX"):
    try:
        info["packages"][name] = md.version(name)
    except md.PackageNotFoundError:
        info["packages"][name] = None
missing = []
for module in ("grain", "tensorflow_datasets", "ml_collections", "tensorboardX",
               "array_record", "tqdm", "crckd_jax.train"):
    try:
        importlib.import_module(module)
    except Exception as e:
        missing.append(f"{module}: {type(e).__name__}: {e}")
info["import_errors"] = missing
try:
    import jax
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [str(d) for d in jax.devices()]
    info["jax_device_kind"] = jax.devices()[0].device_kind
except Exception as e:
    info["jax_error"] = f"{type(e).__name__}: {e}"
print("ENV_JSON " + json.dumps(info))
"""

TORCH_SCRIPT = r"""
import json
import torch, torchvision
info = {"torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
print("TORCH_JSON " + json.dumps(info))
"""


def _json_line(path, prefix):
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(prefix + " "):
                    return json.loads(line[len(prefix) + 1:])
    except (OSError, json.JSONDecodeError):
        pass
    return None


def part_env(ctx) -> dict:
    figures = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total,compute_cap",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            figures["gpus"] = [dict(zip(("name", "driver", "memory", "compute_capability"),
                                        (x.strip() for x in line.split(","))))
                               for line in out.stdout.strip().splitlines() if line.strip()]
            full = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
            figures["cuda_version"] = next(
                (part.split(":")[1].strip().split()[0] for part in full.split("|")
                 if "CUDA Version" in part), None)
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            figures["nvidia_smi_error"] = str(e)
    else:
        figures["gpus"] = []
        figures["nvidia_smi"] = "not found"
    with open("/proc/cpuinfo") as f:
        figures["cpu"] = next((line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name")), "?")
    log = ctx.log("env")
    result = run_part([ctx.args.python, "-c", ENV_SCRIPT], log, ctx.limit("env"), env=ctx.env)
    figures.update(_json_line(log, "ENV_JSON") or {})
    torch_python = ctx.args.torch_python or ctx.args.python
    torch_log = ctx.log("env_torch")
    torch_run = run_part([torch_python, "-c", TORCH_SCRIPT], torch_log,
                         min(60.0, ctx.remaining()), env=ctx.env)
    torch_info = _json_line(torch_log, "TORCH_JSON")
    ctx.torch_probed = True
    if torch_info:
        figures["torch"] = torch_info
        ctx.torch_python = torch_python
    else:
        ctx.torch_python = None
        figures["torch"] = {"error": (log_tail(torch_log, 1).strip()
                                      or torch_run["status"])[:300]}
    result["figures"] = figures
    return result


def step_variants(batch: int) -> str:
    return f"batch={batch},dtype=bfloat16,torch=amp;batch={batch},dtype=float32,torch=float32"


def probe_torch(ctx) -> str | None:
    """The interpreter that imports torch and torchvision (--torch-python, else --python),
    or None."""
    python = ctx.args.torch_python or ctx.args.python
    try:
        proc = subprocess.run([python, "-c", "import torch, torchvision"], env=ctx.env,
                              capture_output=True, timeout=min(60.0, ctx.remaining()))
    except (OSError, subprocess.SubprocessError):
        return None
    return python if proc.returncode == 0 else None


def step_time_cmd(ctx, *args) -> list[str]:
    """benchmarks/step_time.py with the check's model, image size and step counts."""
    s = ctx.settings
    return [ctx.args.python, "benchmarks/step_time.py", "--model", s.model,
            "--image-size", str(s.image_size), *s.step_args, *args]


def with_xla_flag(env: dict, flag: str) -> dict:
    """`env` with `flag` added to its XLA_FLAGS (none added for an empty flag)."""
    return {**env, "XLA_FLAGS": " ".join(filter(None, (env.get("XLA_FLAGS"), flag)))}


def part_step(ctx, name, batch) -> dict:
    if not ctx.torch_probed:
        ctx.torch_python, ctx.torch_probed = probe_torch(ctx), True
    out_json = os.path.join(ctx.out, f"{name}.json")
    trace = os.path.join(ctx.work, f"trace_{name}")
    shutil.rmtree(trace, ignore_errors=True)
    variants = step_variants(batch)
    if ctx.torch_python is None:  # no torch: the JAX rows only
        variants = variants.replace("torch=amp", "torch=off").replace("torch=float32",
                                                                         "torch=off")
    cmd = step_time_cmd(ctx, "--schedule", "sequential", "--memory", "bank", "--augment",
                        "host", "--variants", variants, "--profile", trace, "--json", out_json,
                        "--compilation-cache", ctx.cache)
    if ctx.torch_python:
        cmd += ["--torch-python", ctx.torch_python]
    env = dict(ctx.env)
    # JAX and torch share the GPU: JAX takes 45 % of its memory, torch grows into the rest.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    result = run_part(cmd, ctx.log(name), ctx.limit(name), env=env)
    result["figures"] = step_figures(out_json, torch_available=ctx.torch_python is not None)
    return result


def step_figures(path, torch_available=True) -> dict:
    """Per-variant figures and the profile table from a step_time.py JSON file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {"variants": [], "note": "no step_time JSON (see the log)"}
    rows, profile = [], None
    for v in data.get("variants", []):
        jax_ = v.get("jax", {})
        row = {"label": v.get("label"), **{k: v["spec"].get(k) for k in
                                           ("batch_size", "dtype", "memory", "augment",
                                            "torch")}}
        for key in ("img_s", "median_step_s", "compile_s", "init_s", "trace_s", "loss",
                    "device_peak_mb", "kernels"):
            if key in jax_:
                row[f"jax_{key}"] = jax_[key]
        row["jax_temp_mb"] = jax_.get("executable_mb", {}).get("temp")
        if "torch" in v:
            t = v["torch"]
            row.update(torch_img_s=t.get("img_s"), torch_mode=t.get("mode"),
                       torch_median_step_s=t.get("median_step_s"),
                       torch_device_peak_mb=t.get("device_peak_mb"), ratio=v.get("ratio"))
        elif v["spec"]["torch"] != "off" or not torch_available:
            row["torch"] = "skipped: torch not importable" if not torch_available else \
                "no torch result (see the log)"
        rows.append(row)
        prof = jax_.get("profile") or {}
        if profile is None and (prof.get("top_ops") or "failed" in prof.get("source", "")):
            profile = {"variant": v.get("label"), **prof}
    return {"variants": rows, "profile": profile}


def trainer_figures(workdir, batch_size, warmup_records, child_cpu_s=None) -> dict:
    """Images/s of the trainer (median of the train records after `warmup_records`) and host
    CPU per image (from `process_cpu_s` of the records, else the run's whole CPU time)."""
    path = os.path.join(workdir, "metrics.jsonl")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return {"note": "no metrics.jsonl"}
    train = [r for r in records if r.get("split") == "train"]
    figures = {"train_records": len(train), "steps": train[-1]["step"] if train else 0}
    steady = train[warmup_records:]
    rates = [r["images_per_s"] for r in steady if "images_per_s" in r]
    if rates:
        figures.update(images_per_s_median=statistics.median(rates),
                       images_per_s_mean=statistics.fmean(rates),
                       images_per_s_records=len(rates))
    cpu = [r for r in steady if "process_cpu_s" in r]
    if len(cpu) >= 2:
        d_cpu = cpu[-1]["process_cpu_s"] - cpu[0]["process_cpu_s"]
        d_img = (cpu[-1]["step"] - cpu[0]["step"]) * batch_size
        figures["host_cpu_ms_per_image"] = 1000 * d_cpu / d_img
        figures["host_cpu_source"] = (
            f"process_cpu_s between steps {cpu[0]['step']} and {cpu[-1]['step']} (trainer "
            "process; grain worker processes, if any, not included)")
    elif child_cpu_s is not None and figures["steps"]:
        images = figures["steps"] * batch_size
        figures["host_cpu_ms_per_image"] = 1000 * child_cpu_s / images
        figures["host_cpu_source"] = (
            "whole run's CPU time (user + system of the process and its children, start-up, "
            "data generation, compiling and evaluation included) / trained images: an upper "
            "bound; the records have no process_cpu_s")
    return figures


def part_trainer(ctx) -> dict:
    s = ctx.settings
    workdir = os.path.join(ctx.work, "trainer")
    shutil.rmtree(workdir, ignore_errors=True)  # never resume an earlier run
    cmd = [ctx.args.python, "launch.py", "--config", s.trainer_config, "--workdir", workdir,
           f"--config.data.tfds_dir={os.path.join(ctx.work, 'tfds')}",
           f"--config.train.compilation_cache_dir={ctx.cache}", *s.trainer_overrides]
    result = run_part(cmd, ctx.log("trainer"), ctx.limit("trainer"), env=ctx.env)
    batch = int(next(o.split("=")[1] for o in s.trainer_overrides
                     if o.startswith("--config.train.batch_size=")))
    figures = trainer_figures(workdir, batch, s.trainer_warmup_records, result["child_cpu_s"])
    # Step-only images/s of the same setting (bfloat16, queue, device augmentation, same
    # batch), from the loop part.
    step_only = ctx.results.get("loop", {}).get("figures", {}).get("step_img_s")
    if isinstance(step_only, float):
        figures["step_only_images_per_s"] = step_only
        if figures.get("images_per_s_median"):
            figures["trainer_vs_step"] = figures["images_per_s_median"] / step_only
    result["figures"] = figures
    return result


def part_demo(ctx) -> dict:
    s = ctx.settings
    workdir = os.path.join(ctx.work, "demo")
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [ctx.args.python, "launch.py", "--config", s.demo_config, "--workdir", workdir,
           f"--config.data.tfds_dir={os.path.join(ctx.work, 'tfds')}",
           f"--config.train.compilation_cache_dir={ctx.cache}", *s.demo_overrides]
    result = run_part(cmd, ctx.log("demo"), ctx.limit("demo"), env=ctx.env)
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        result["figures"] = {"summary": summary}
    except (OSError, json.JSONDecodeError):
        result["figures"] = {"note": "no summary.json"}
    records = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(records):
        result["figures"].update(trainer_figures(workdir, 0, 1))
    return result


def part_loop(ctx) -> dict:
    cmd = [ctx.args.python, "benchmarks/train_loop.py", "--real-step", *ctx.settings.loop_args,
           "--workdir", os.path.join(ctx.work, "train_loop")]
    log = ctx.log("loop")
    result = run_part(cmd, log, ctx.limit("loop"), env=ctx.env)
    result["figures"] = _result_line(log)
    return result


def part_folds(ctx) -> dict:
    cmd = [ctx.args.python, "benchmarks/fold_stack.py", *ctx.settings.folds_args]
    env = {**ctx.env, "JAX_COMPILATION_CACHE_DIR": ctx.cache}
    log = ctx.log("folds")
    result = run_part(cmd, log, ctx.limit("folds"), env=env)
    result["figures"] = _result_line(log)
    return result


FUSION_AUTOTUNER_OFF = "--xla_gpu_experimental_enable_fusion_autotuner=false"


def step_b64_bfloat16(s: Settings) -> str:
    """The step_b64 part's bfloat16 row as a step_time.py variant, without torch."""
    return f"batch={s.batches[0]},dtype=bfloat16,memory=bank,augment=host,torch=off"


def part_autotuner(ctx) -> dict:
    """The step compiled with XLA's fusion autotuner and without, each in a fresh process
    with an empty compilation cache (so that each compile autotunes as a first one does)."""
    s = ctx.settings
    variant = step_b64_bfloat16(s)
    result = {"status": "ok", "seconds": 0.0, "limit_s": round(s.limits["autotuner"]),
              "figures": {}}
    for setting, flag in (("on", ""), ("off", FUSION_AUTOTUNER_OFF)):
        cache = os.path.join(ctx.work, f"jax_cache_autotuner_{setting}")
        shutil.rmtree(cache, ignore_errors=True)
        out_json = os.path.join(ctx.out, f"autotuner_{setting}.json")
        cmd = step_time_cmd(ctx, "--variants", variant, "--json", out_json,
                            "--compilation-cache", cache)
        limit = ctx.limit("autotuner") - result["seconds"]
        if setting == "on":
            limit /= 2
        run = run_part(cmd, ctx.log(f"autotuner_{setting}"), limit,
                       env=with_xla_flag(ctx.env, flag))
        result["seconds"] = round(result["seconds"] + run["seconds"], 1)
        if run["status"] != "ok":
            result.update(status=run["status"], note=f"fusion autotuner {setting}: see "
                          f"autotuner_{setting}.log")
            break
        rows = step_figures(out_json, torch_available=False)["variants"]
        if rows:
            result["figures"][setting] = {"img_s": rows[0].get("jax_img_s"),
                                          "compile_s": rows[0].get("jax_compile_s")}
    return result


COMMAND_BUFFERS_OFF = "--xla_gpu_enable_command_buffer="


def part_kernel_time(ctx) -> dict:
    """The step profiled without command buffers: device time per step by kernel kind."""
    out_json = os.path.join(ctx.out, "kernel_time.json")
    trace = os.path.join(ctx.work, "trace_kernel_time")
    shutil.rmtree(trace, ignore_errors=True)
    variant = step_b64_bfloat16(ctx.settings)
    cmd = step_time_cmd(ctx, "--variants", variant, "--profile", trace, "--json", out_json,
                        "--compilation-cache", ctx.cache)
    result = run_part(cmd, ctx.log("kernel_time"), ctx.limit("kernel_time"),
                      env=with_xla_flag(ctx.env, COMMAND_BUFFERS_OFF))
    result["figures"] = step_figures(out_json)
    return result


def part_kernels(ctx) -> dict:
    s = ctx.settings
    out_json = os.path.join(ctx.out, "kernels.json")
    batch = s.batches[0]
    variants = ";".join(f"batch={batch},dtype=bfloat16,memory=queue,augment=device,"
                        f"kernels={k},torch=off" for k in ("standard", "cpu"))
    cmd = step_time_cmd(ctx, "--schedule", "interleaved", "--variants", variants,
                        "--json", out_json, "--compilation-cache", ctx.cache)
    result = run_part(cmd, ctx.log("kernels"), ctx.limit("kernels"), env=ctx.env)
    result["figures"] = step_figures(out_json, torch_available=False)
    return result


def part_startup(ctx) -> dict:
    s = ctx.settings
    out_json = os.path.join(ctx.work, "startup.json")
    cmd = [ctx.args.python, "benchmarks/startup.py", "--config", s.trainer_config,
           "--model", s.model, "--image-size", str(s.image_size),
           "--batch-size", str(s.batches[0]), "--json", out_json]
    result = run_part(cmd, ctx.log("startup"), ctx.limit("startup"), env=ctx.env)
    try:
        with open(out_json) as f:
            result["figures"] = {k: v for k, v in json.load(f).items() if k != "args"}
    except (OSError, json.JSONDecodeError):
        result["figures"] = {"note": "no startup JSON (see the log)"}
    return result


def _result_line(log_path) -> dict:
    """The KEY=VALUE pairs of a benchmark's last `RESULT` line, as floats where they parse."""
    figures = {}
    try:
        with open(log_path, errors="replace") as f:
            lines = [line for line in f if line.startswith("RESULT ")]
    except OSError:
        lines = []
    for item in (lines[-1].split()[1:] if lines else []):
        key, _, value = item.partition("=")
        try:
            figures[key] = float(value)
        except ValueError:
            figures[key] = value
    return figures or {"note": "no RESULT line (see the log)"}


# ----------------------------------------------------------------------------- driver


class Context:
    def __init__(self, args, settings):
        self.args, self.settings = args, settings
        self.out = os.path.abspath(args.out)
        self.work = os.path.abspath(args.workdir)
        self.site = os.path.join(self.work, "site")
        self.cache = os.path.join(self.work, "jax_cache")
        budget = args.budget or (1500.0 if args.tiny else 475.0)
        self.deadline = time.monotonic() + budget
        self.budget = budget
        self.results: dict[str, dict] = {}
        self.torch_python = None  # set by the env part or probe_torch
        self.torch_probed = False
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        pythonpath = [self.site, ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath),
                    "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "1"}

    def env_without_site(self):
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in env["PYTHONPATH"].split(os.pathsep) if p != self.site)
        return env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, part) -> float:
        return min(self.settings.limits[part], self.remaining())

    def log(self, part) -> str:
        return os.path.join(self.out, f"{part}.log")


def summary_text(summary: dict) -> str:
    """The summary as readable text."""
    out = [f"crckd-jax GPU check ({'tiny CPU dry run' if summary['tiny'] else 'GPU'}), "
           f"{summary['started']}, {summary['elapsed_s']:.0f} s of {summary['budget_s']:.0f} s"]
    parts = summary["parts"]
    out.append("")
    out.append(f"{'part':10} {'status':9} {'seconds':>8} {'limit':>6}  note")
    for name, r in parts.items():
        note = r.get("note", "")
        if r["status"] in ("failed", "timeout") and r.get("log_tail"):
            note = r["log_tail"].strip().splitlines()[-1][:100]
        out.append(f"{name:10} {r['status']:9} {r.get('seconds', 0):8.1f} "
                   f"{r.get('limit_s', 0):6}  {note}")
    env = parts.get("env", {}).get("figures", {})
    if env:
        out.append("")
        gpus = ", ".join(f"{g.get('name')} ({g.get('memory')}, driver {g.get('driver')})"
                         for g in env.get("gpus", [])) or "none"
        out.append(f"GPU: {gpus}; CUDA {env.get('cuda_version')}; CPU: {env.get('cpu')} x "
                   f"{env.get('cpu_count')}")
        out.append(f"Python {env.get('python')}; JAX backend {env.get('jax_backend')}, "
                   f"devices {env.get('jax_devices')}")
        pk = env.get("packages", {})
        out.append("packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v))
        if env.get("import_errors"):
            out.append("import errors: " + "; ".join(env["import_errors"]))
        out.append(f"torch: {env.get('torch')}")
    for name in ("step_b64", "kernels", "step_b32", "kernel_time"):
        fig = parts.get(name, {}).get("figures", {})
        if not fig.get("variants"):
            continue
        out.append("")
        out.append(f"{name}: step benchmark (img/s = batch / median step time)")
        out.append(f"  {'variant':56} {'JAX img/s':>10} {'compile s':>9} {'torch':>14} "
                   f"{'torch img/s':>11} {'ratio':>6}")
        for v in fig["variants"]:
            if v.get("torch_mode"):  # e.g. "amp float16 NCHW threads=16"
                torch_mode = " ".join(w for w in v["torch_mode"].split()[:2]
                                      if w not in ("NCHW", "channels_last"))
            elif v.get("torch", "off") == "off":
                torch_mode = "-"
            else:
                torch_mode = "skipped" if "skipped" in v["torch"] else "missing"
            out.append(
                f"  {v['label']:56} {_f(v.get('jax_img_s'), 10, 1)} "
                f"{_f(v.get('jax_compile_s'), 9, 1)} {torch_mode[:14]:>14} "
                f"{_f(v.get('torch_img_s'), 11, 1)} {_f(v.get('ratio'), 6, 2)}")
        prof = fig.get("profile")
        if prof and not prof.get("top_ops"):
            out.append(f"  profile of {prof['variant']}: {prof.get('source')}")
        elif prof:
            out.append(f"  profile of {prof['variant']} ({prof['source']}): "
                       f"{prof['total_ms_per_step']:.2f} ms of op time per step; top ops:")
            for op in prof["top_ops"][:12]:
                out.append(f"    {op['ms_per_step']:8.3f} ms {100 * op['share']:5.1f}% "
                           f"{op['calls_per_step']:5.0f} calls  {op['op'][:90]}")
    tr = parts.get("trainer", {}).get("figures", {})
    if tr:
        out.append("")
        out.append(
            f"trainer: {tr.get('steps')} steps, {_f(tr.get('images_per_s_median'), 0, 1)} img/s "
            f"(median of {tr.get('images_per_s_records')} records after warm-up), step-only "
            f"{_f(tr.get('step_only_images_per_s'), 0, 1)} img/s, trainer/step "
            f"{_f(tr.get('trainer_vs_step'), 0, 2)}; host CPU "
            f"{_f(tr.get('host_cpu_ms_per_image'), 0, 2)} ms per image "
            f"({tr.get('host_cpu_source', '-')})")
    loop = parts.get("loop", {}).get("figures", {})
    if "ratio" in loop:
        out.append("")
        out.append(f"loop (one process, back to back): trainer "
                   f"{_f(loop.get('trainer_img_s'), 0, 1)} img/s, step only "
                   f"{_f(loop.get('step_img_s'), 0, 1)} img/s, ratio {_f(loop['ratio'], 0, 3)}; "
                   f"host CPU {_f(loop.get('trainer_cpu_ms_per_image'), 0, 2)} ms per "
                   "trained image (trainer process, all threads)")
    folds = parts.get("folds", {}).get("figures", {})
    if "ratio" in folds:
        out.append("")
        out.append(f"folds side by side: {folds['folds']:.0f} folds "
                   f"{_f(folds.get('stacked_img_s'), 0, 1)} img/s (all folds together), one "
                   f"fold {_f(folds.get('one_img_s'), 0, 1)} img/s, ratio "
                   f"{_f(folds['ratio'], 0, 2)}")
    tuner = parts.get("autotuner", {}).get("figures", {})
    if tuner:
        out.append("")
        out.append("fusion autotuner (fresh cache each): " + "; ".join(
            f"{setting}: compile {_f(f.get('compile_s'), 0, 1)} s, "
            f"{_f(f.get('img_s'), 0, 1)} img/s" for setting, f in tuner.items()))
    start = parts.get("startup", {}).get("figures", {})
    if "cold_s" in start:
        out.append("")
        out.append(f"startup: first step {start['cold_s']:.1f} s cold, {start['warm_s']:.1f} s "
                   f"warm cache, {_f(start.get('resumed_s'), 0, 1)} s resumed "
                   f"({start.get('written_cold')} executables cached, "
                   f"{start.get('written_warm')} written by the warm start)")
        for label in ("cold", "warm", "resumed"):
            functions = start.get(f"{label}_breakdown", {}).get("functions", {})
            for name, phases in functions.items():
                out.append(f"  {label}: {name}: {startup.phase_text(phases)}")
    demo = parts.get("demo", {}).get("figures", {})
    if demo.get("summary"):
        final = demo["summary"].get("final") or {}
        out.append("")
        out.append("demo (1 epoch): final test " + ", ".join(
            f"{k}={final[k]:.4f}" for k in ("bacc", "f1", "auc_ovr") if k in final)
            + f"; {_f(demo.get('images_per_s_median'), 0, 1)} img/s")
    return "\n".join(out) + "\n"


def _f(x, width, digits) -> str:
    return f"{x:{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def main(argv=None):
    args = parse_args(argv)
    settings = tiny_settings() if args.tiny else gpu_settings()
    ctx = Context(args, settings)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(wanted) - set(PARTS)
    if unknown:
        raise SystemExit(f"error: unknown parts {sorted(unknown)}; known: {PARTS}")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    runners = {
        "wheels": part_wheels, "env": part_env,
        "step_b64": lambda c: part_step(c, "step_b64", settings.batches[0]),
        "trainer": part_trainer, "demo": part_demo, "loop": part_loop,
        "kernels": part_kernels, "startup": part_startup,
        "step_b32": lambda c: part_step(c, "step_b32", settings.batches[1]),
        "folds": part_folds, "autotuner": part_autotuner, "kernel_time": part_kernel_time,
    }

    def write():
        summary = {"started": started, "elapsed_s": round(time.monotonic() - t0, 1),
                   "budget_s": ctx.budget, "tiny": args.tiny, "settings":
                   dataclasses.asdict(settings), "parts": ctx.results}
        with open(os.path.join(ctx.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(ctx.out, "summary.txt"), "w") as f:
            f.write(summary_text(summary))
        return summary

    for name in PARTS:
        if name not in wanted:
            continue
        if ctx.remaining() < MIN_USEFUL_S:
            ctx.results[name] = {"status": "skipped", "note": "no time left in the budget"}
            continue
        print(f"== {name} ({time.monotonic() - t0:.0f} s elapsed, {ctx.remaining():.0f} s "
              f"left)", flush=True)
        try:
            result = runners[name](ctx)
        except Exception as e:  # a bug in one part must not stop the others
            result = {"status": "failed", "note": f"driver error: {type(e).__name__}: {e}"}
        if result.get("status") in ("failed", "timeout"):
            result["log_tail"] = log_tail(ctx.log(name))
        ctx.results[name] = result
        print(f"   {name}: {result.get('status')} in {result.get('seconds', 0)} s", flush=True)
        write()
    summary = write()
    sys.stdout.write(summary_text(summary))


if __name__ == "__main__":
    main()
