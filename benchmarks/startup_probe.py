"""`python launch.py ...` in this interpreter, with JAX's compile events written to a file.

    STARTUP_EVENTS=events.jsonl python benchmarks/startup_probe.py --config ... --workdir W

`benchmarks/startup.py` starts its runs through this script to see where a start's time
goes. It registers a `jax.monitoring` duration listener, then runs launch.py as `__main__`
with the same arguments. Each event is one JSON line:
{"t": seconds since this script started, "event": JAX's event name, "s": its duration in
seconds, "fun": the traced function's name (trace and lowering events) or the executable's
(compile events)}. Nothing in the training run changes: JAX records these events whether or
not anyone listens.
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import sys
import time

START = time.perf_counter()
ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    events = open(os.environ["STARTUP_EVENTS"], "a", buffering=1)
    import jax  # the import is part of the measured start

    def record(event: str, duration: float, **kwargs) -> None:
        events.write(json.dumps({"t": time.perf_counter() - START, "event": event,
                                 "s": duration, "fun": str(kwargs.get("fun_name", ""))})
                     + "\n")

    jax.monitoring.register_event_duration_secs_listener(record)
    launch = str(ROOT / "launch.py")
    sys.argv = [launch, *sys.argv[1:]]
    sys.path.insert(0, str(ROOT))
    runpy.run_path(launch, run_name="__main__")


if __name__ == "__main__":
    main()
