"""The header every committed benchmark result carries: command, machine, date, versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()} ({torch.version.cuda})"
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def _command() -> str:
    """The command as typed from the repository root (``python -m bench.x`` shows up as a path)."""
    script = os.path.relpath(sys.argv[0])
    if script.startswith("bench/") and script.endswith(".py"):
        return "python -m " + script[:-3].replace("/", ".") + " " + shlex.join(sys.argv[1:])
    return "python " + shlex.join([script, *sys.argv[1:]])


def header() -> dict:
    import transformers
    import triton

    return {
        "command": _command(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "triton": triton.__version__},
    }


def header_markdown(h: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in h["versions"].items())
    return (f"- command: `{h['command']}`\n- machine: {h['machine']}\n- date: {h['date']}\n"
            f"- versions: {versions}\n")


def write_result(out: str | Path, stem: str, result: dict, markdown: str, echo: bool = True) -> None:
    """Writes <out>/<stem>.json and .md and (echo) prints the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown)
    if echo:
        print(markdown)


def alternating_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The median wall ms of each of ``runs`` over ``repeats`` rounds, each round running every one
    in turn after a first round that warms up: runs compared side by side share the machine's
    conditions (its memory bandwidth drifts from minute to minute)."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(repeats + 1):
        for label, fn in runs.items():
            start = time.perf_counter()
            fn()
            if i:
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


def others_cpu_s() -> float:
    """CPU seconds spent so far by everything on this machine except this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - own.user - own.system


def run_alone(fn, max_share: float = 0.05, window_s: float = 1.0):
    """Runs fn() on a quiet machine: first waits until other processes use under ``max_share`` of a
    core for ``window_s``, then redoes fn() while they took more than ``max_share`` of its wall time.
    Two cores shared with another job can slow a 2-thread run 10x or more (its threads end up on
    one core), so a shared measurement is not kept. Returns (fn's result, redone runs)."""
    redone = 0
    while True:
        while True:
            before = others_cpu_s()
            time.sleep(window_s)
            if others_cpu_s() - before <= max_share * window_s:
                break
        before, start = others_cpu_s(), time.perf_counter()
        result = fn()
        if others_cpu_s() - before <= max_share * max(time.perf_counter() - start, window_s):
            return result, redone
        redone += 1
