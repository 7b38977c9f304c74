"""The header every committed benchmark result carries: command, machine, date, versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
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

    return {
        "command": _command(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def header_markdown(h: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in h["versions"].items())
    return (f"- command: `{h['command']}`\n- machine: {h['machine']}\n- date: {h['date']}\n"
            f"- versions: {versions}\n")


def write_result(out: str | Path, stem: str, result: dict, markdown: str) -> None:
    """Writes <out>/<stem>.json and .md and prints the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
