"""Start-up time: from `python launch.py` to the first finished train step.

Runs the job twice in fresh workdirs that share one empty persistent compilation cache:
the first start compiles everything (cold), the second finds the compiled executables in
the cache (warm). The data is prepared once beforehand: the synthetic images are generated
in a shared folder (`data.dir`) and the TFDS data set is built in another (`data.tfds_dir`),
as a real data set is prepared once, so both starts do the same work: listing the images,
finding the stored data set, writing the folds, building the model and state, compiling (or
loading) the step, and one step. A third start resumes the warm run from its checkpoint of
step 1 (what a preempted job does): restoring replaces creating the state. The time of a
start ends at its first train record; the run is stopped once its checkpoint of that step
is on disk (every run checkpoints every step).

    python benchmarks/startup.py [--config configs/demo.py] [--model densenet121]
        [--image-size 224] [--batch-size 16] [--xla-options default|none|onednn]

--model, --image-size and --batch-size override the config's (the synthetic images are
generated at --image-size). Besides the times, it counts the executables each start wrote
to the cache (JAX writes one entry per compiled executable; a warm start that writes none
compiled nothing that the cache could hold) and reports the cache's size.

Where each start's time goes: the runs go through `startup_probe.py` (launch.py in the same
interpreter, with JAX's compile events recorded), and each start is broken down into the
time before the first traced function (imports, data set, folds), and for every function
that took at least 0.1 s: its tracing, its lowering to StableHLO, and its compilation or,
on a cache hit, the loading of its executable from the cache; the rest (the first step
itself, small executables, checkpoint and logger set-up) is the remainder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cache_entries(cache: str) -> set[str]:
    path = pathlib.Path(cache)
    return {p.name for p in path.iterdir() if p.name.endswith("-cache")} if path.exists() else set()


TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_READ = "/jax/compilation_cache/cache_retrieval_time_sec"


def breakdown(events: list[dict], total: float, min_s: float = 0.1) -> dict:
    """A start's time, from its compile events (`startup_probe.py`) until its first step
    ended at `total` s: {'before_first_trace_s', 'functions': {name: {'trace_s',
    'lower_s', 'compile_s' | 'cache_load_s'}}, 'rest_s'}. Functions whose phases add up to
    less than `min_s` are counted in the rest."""
    events = [e for e in events if e["t"] <= total]
    traces = [e for e in events if e["event"] == TRACE]
    reads = [e["t"] for e in events if e["event"] == CACHE_READ]
    functions: dict[str, dict[str, float]] = {}
    for e in events:
        name = e["fun"][4:-1] if e["fun"].startswith("jit(") else e["fun"]
        if e["event"] == TRACE:
            phase = "trace_s"
        elif e["event"] == LOWER:
            phase = "lower_s"
        elif e["event"] == COMPILE:  # a cache hit records its read just before
            phase = "cache_load_s" if any(abs(e["t"] - t) < 0.05 for t in reads) \
                else "compile_s"
        else:
            continue
        phases = functions.setdefault(name, {})
        phases[phase] = phases.get(phase, 0.0) + e["s"]
    functions = {k: v for k, v in functions.items() if sum(v.values()) >= min_s}
    first = min((e["t"] - e["s"] for e in traces), default=total)
    accounted = first + sum(sum(v.values()) for v in functions.values())
    return {"before_first_trace_s": first, "functions": functions,
            "rest_s": total - accounted}


def phase_text(phases: dict[str, float]) -> str:
    """One function's phases of `breakdown`, e.g. 'trace 8.2 s, lower 2.0 s, cache load 11.1 s'."""
    return ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in phases.items())


def print_breakdown(label: str, total: float, parts: dict) -> None:
    print(f"{label}: {total:.1f} s to the first finished step")
    print(f"  {'before the first trace (imports, data set, folds)':<58}"
          f"{parts['before_first_trace_s']:>7.1f} s")
    for name, phases in parts["functions"].items():
        print(f"  {name + ': ' + phase_text(phases):<58}{sum(phases.values()):>7.1f} s")
    print(f"  {'rest (first step, small executables, set-up)':<58}{parts['rest_s']:>7.1f} s")


def time_to_first_step(command: list[str], workdir: pathlib.Path, env: dict,
                       after_step: int = 0) -> tuple[float, list[dict]]:
    """Seconds from the start of `command` to its first train record of a step past
    `after_step`, and the compile events `startup_probe.py` recorded until then. The run
    is stopped (SIGKILL) once its checkpoint of that step is on disk."""
    records = workdir / "metrics.jsonl"
    events_file = workdir.with_name(f"{workdir.name}_after_{after_step}_events.jsonl")
    events_file.unlink(missing_ok=True)
    env = dict(env, STARTUP_EVENTS=str(events_file))

    def first_step() -> int | None:
        lines = records.read_text().splitlines() if records.exists() else []
        steps = [r["step"] for r in map(json.loads, lines)
                 if r["split"] == "train" and r["step"] > after_step]
        return steps[0] if steps else None

    start, total = time.perf_counter(), None
    proc = subprocess.Popen(command + ["--workdir", str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            step = first_step()
            if total is None and step is not None:
                total = time.perf_counter() - start
            if total is not None and (workdir / "checkpoints" / str(step)).is_dir():
                proc.kill()
                proc.wait()
                events = [json.loads(line) for line in events_file.read_text().splitlines()]
                return total, events
            time.sleep(0.05)
        raise RuntimeError(f"launch.py ended before its first step: {proc.stderr.read()[-2000:]}")
    finally:
        proc.kill()
        proc.wait()


def preempted_after_step_1(workdir: pathlib.Path) -> None:
    """Leaves `workdir` as a run stopped right after its checkpoint of step 1: later
    checkpoints and records (a fast step may have got further before it was stopped) go."""
    for path in (workdir / "checkpoints").iterdir():
        if not path.name.isdigit() or int(path.name) > 1:
            shutil.rmtree(path)
    records = workdir / "metrics.jsonl"
    kept = [line for line in records.read_text().splitlines() if json.loads(line)["step"] <= 1]
    records.write_text("".join(line + "\n" for line in kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    parser.add_argument("--model", default=None, help="model.name override")
    parser.add_argument("--image-size", type=int, default=None,
                        help="data.image_size and data.synthetic_image_size override")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size override")
    parser.add_argument("--xla-options", default=None,
                        help="CRCKD_XLA_OPTIONS of the runs (default|none|onednn)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    overrides = []
    if args.model:
        overrides.append(f"--config.model.name={args.model}")
    if args.image_size:
        overrides += [f"--config.data.image_size={args.image_size}",
                      f"--config.data.synthetic_image_size={args.image_size}"]
    if args.batch_size:
        overrides.append(f"--config.train.batch_size={args.batch_size}")
    env = dict(os.environ)
    if args.xla_options:
        env["CRCKD_XLA_OPTIONS"] = args.xla_options
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data, cache = str(tmp / "tfds"), str(tmp / "cache")
        flags = ["--config", args.config, *overrides,
                 f"--config.data.dir={tmp / 'images'}", f"--config.data.tfds_dir={data}"]
        subprocess.run([sys.executable, str(ROOT / "launch.py"), *flags, "--workdir",
                        str(tmp / "prepared"), "--mode", "prepare"],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        run = [sys.executable, str(ROOT / "benchmarks" / "startup_probe.py"), *flags,
               "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=1",
               f"--config.train.compilation_cache_dir={cache}"]
        cold, cold_events = time_to_first_step(run, tmp / "cold", env)
        after_cold = cache_entries(cache)
        warm, warm_events = time_to_first_step(run, tmp / "warm", env)
        after_warm = cache_entries(cache)
        preempted_after_step_1(tmp / "warm")
        resumed, resumed_events = time_to_first_step(run, tmp / "warm", env, after_step=1)
        size_mb = sum(p.stat().st_size for p in pathlib.Path(cache).iterdir()) / 2**20 \
            if pathlib.Path(cache).exists() else 0.0
    written_cold, written_warm = len(after_cold), len(after_warm - after_cold)
    cold_parts, warm_parts, resumed_parts = (
        breakdown(events, total) for events, total in
        ((cold_events, cold), (warm_events, warm), (resumed_events, resumed)))
    print_breakdown("cold cache", cold, cold_parts)
    print_breakdown("warm cache", warm, warm_parts)
    print_breakdown("resumed from step 1, warm cache", resumed, resumed_parts)
    print(f"first step after start: cold cache {cold:.1f} s, warm cache {warm:.1f} s "
          f"(ratio {cold / warm:.2f}); executables written to the cache: cold start "
          f"{written_cold}, warm start {written_warm}; cache {size_mb:.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cold_s": cold, "warm_s": warm, "written_cold": written_cold,
                       "written_warm": written_warm, "cache_mb": size_mb,
                       "resumed_s": resumed, "cold_breakdown": cold_parts,
                       "warm_breakdown": warm_parts, "resumed_breakdown": resumed_parts,
                       "args": vars(args)}, f, indent=1)
    print(f"RESULT cold_s={cold:.1f} warm_s={warm:.1f} resumed_s={resumed:.1f} "
          f"written_cold={written_cold} written_warm={written_warm}")


if __name__ == "__main__":
    main()
