"""Prefix caching across requests, on and off side by side: GSM8K end to end, tok/s and time to first token.

    python -m bench.prefix_cache [--limit 30] [--methods ensemble se] [--models SMALL LARGE]
                                 [--max-new-tokens N] [--no-alone] [--out bench/results]

The real pair (bench.e2e's models, bf16, batch 1), ensemble weighted-t1 (0.5 / 0.5, T = 1, e2e's
gammas), the first --limit GSM8K tasks (their few-shot template is shared: about 600 tokens), seed =
task index. Each method runs on two engines, the prefix cache on and off, on two copies of the models
(an engine writing a slot of the other's models would void its cached entry), one method after the
other; each task runs on both engines before the next, each run timed alone (bench.env.run_alone). A
cached engine's slot holds the previous task's prompt and output when the next task arrives, as a
server's would. Tokens/s: new
tokens over the wall time of the calls (prefill included); TTFT: submission to the first token.
Both settings emit the same tokens (tests/test_prefix_cache.py); the report counts the tasks where
they did. -> bench/results/prefix-cache-<device>.{md,json}
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from bench.datasets import DATASETS_BY_NAME
from bench.e2e import ENSEMBLES, LARGE, SMALL
from bench.env import header, header_markdown, run_alone, write_result
from se_engine.engine import Engine
from se_engine.runner import load_model
from se_engine.sampling import SamplingParams

ENSEMBLE = "weighted-t1"
SETTINGS = {"on": True, "off": False}  # label -> Engine(prefix_cache=...)


def timed(engine: Engine, prompt: str, params: SamplingParams) -> dict:
    """One generation: its tokens, wall time, time to first token and prefix-cache counters."""
    start, first = time.perf_counter(), None
    for out in engine.stream(prompt, params):
        if first is None and out.token_ids:
            first = time.perf_counter() - start
        if out.result is not None:
            result = out.result
    m = result.metrics
    return {"token_ids": result.token_ids, "tokens": len(result.token_ids), "wall_s": time.perf_counter() - start,
            "ttft_s": first, "prefix_tokens": m.prefix_tokens, "positions_scored": m.positions_scored}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=30, help="GSM8K tasks")
    ap.add_argument("--methods", nargs="+", choices=["ensemble", "se"], default=["ensemble", "se"])
    ap.add_argument("--models", nargs=2, default=[SMALL, LARGE], metavar=("SMALL", "LARGE"),
                    help="e.g. tiny-random-llama tiny-random-qwen2 for a check of the script")
    ap.add_argument("--max-new-tokens", type=int, default=DATASETS_BY_NAME["gsm8k"].max_new_tokens)
    ap.add_argument("--alone", action=argparse.BooleanOptionalAction, default=True,
                    help="time each run on a quiet machine, redoing runs that shared the CPU (bench.env.run_alone)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    cfg = ENSEMBLES[ENSEMBLE]
    tasks = DATASETS_BY_NAME["gsm8k"].load(args.limit + 1)
    warm = tasks.pop()  # not measured: the cached engines then start from its template, not a task's prompt
    copies = {label: [load_model(n, max_len=4096) for n in args.models] for label in SETTINGS}
    result = {**header(), "models": args.models, "ensemble": ENSEMBLE, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "runs": {f"{m}/{s}": [] for m in args.methods for s in SETTINGS}}
    stem = f"prefix-cache-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    for method in args.methods:
        engines = {label: Engine(copies[label], cfg.spec, method, list(cfg.gammas), prefix_cache=on)
                   for label, on in SETTINGS.items()}
        for engine in engines.values():  # allocations, thread pools
            engine.generate(warm.prompt, SamplingParams(max_new_tokens=8, seed=0))
        for i, task in enumerate(tqdm(tasks, desc=method, unit="task")):
            params = SamplingParams(temperature=cfg.temperature, seed=i, max_new_tokens=args.max_new_tokens)
            for label, engine in engines.items():
                run = lambda: timed(engine, task.prompt, params)  # noqa: E731
                row, redone = run_alone(run) if args.alone else (run(), 0)
                result["runs"][f"{method}/{label}"].append({**row, "redone": redone})
            write_result(args.out, stem, result, markdown(result), echo=False)
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["# Prefix caching across requests: on and off", "", header_markdown(result),
             f"- models: {', '.join(result['models'])}; bf16, batch 1, native runner; ensemble {result['ensemble']}",
             f"- workload: the first {result['limit']} GSM8K tasks (one few-shot template), up to "
             f"{result['max_new_tokens']} new tokens, seed = task index; one method after the other, each task "
             "with the cache on and off before the next",
             "- reused / task: prompt tokens whose cache entries a task reused, mean over the models",
             f"- runs redone because another process used the CPU meanwhile: "
             f"{sum(r['redone'] for rows in result['runs'].values() for r in rows)}", "",
             "| method | prefix cache | tasks | tok/s | TTFT p50 (s) | TTFT mean (s) | reused / task | "
             "same tokens as off |", "|---|---|---|---|---|---|---|---|"]
    runs = result["runs"]
    for key, rows in runs.items():
        if not rows:
            continue
        method, label = key.split("/")
        off = runs[f"{method}/off"]
        ttft = [r["ttft_s"] for r in rows]
        reused = statistics.fmean(statistics.fmean(r["prefix_tokens"]) for r in rows)
        same = "-" if label == "off" else f"{sum(r['token_ids'] == o['token_ids'] for r, o in zip(rows, off))}/{len(off)}"
        lines.append(f"| {method} | {label} | {len(rows)} | {sum(r['tokens'] for r in rows) / sum(r['wall_s'] for r in rows):.2f} "
                     f"| {statistics.median(ttft):.3f} | {statistics.fmean(ttft):.3f} | {reused:.0f} "
                     f"| {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
