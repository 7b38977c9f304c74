"""Throughput of the standard ensemble and speculative ensemble as the batch grows.

    python -m bench.batch [--batches 1 4 8] [--prompts 16] [--max-new-tokens 64]

The real pair (Qwen2.5-Coder 0.5B + 1.5B Instruct, bf16, native runner), weighted 0.5/0.5 at T = 1, on
the first --prompts HumanEval prompts (raw completion, stop at EOS or --max-new-tokens, seed = prompt
index). For every batch size B the same requests go through ``engine.generate`` with ``max_batch=B``
(continuous batching: a finished sequence's slot goes to the next waiting prompt). Total tokens/s is
all emitted tokens over the wall time of the whole ``generate`` call (prefill included); the SE
speed-up is against ``ensemble`` at the same B, measured in the same run. Writes
bench/results/batch-<device>.{md,json} after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.env import header, header_markdown, write_result
from bench.datasets import humaneval_tasks
from bench.speedup import LARGE, SMALL
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.runner import load_model
from se_engine.sampling import SamplingParams

RUNS = [("ensemble", None), ("se", [6, 1]), ("se", "auto")]


def markdown(result: dict) -> str:
    lines = ["# Batched throughput: standard ensemble vs speculative ensemble", "", header_markdown(result),
             f"- models: {SMALL} + {LARGE}, weighted 0.5/0.5, T = 1, bf16, native runner",
             f"- workload: first {result['prompts']} HumanEval prompts (raw completion), up to "
             f"{result['max_new_tokens']} new tokens, stop at EOS, seed = prompt index; all submitted at "
             "once, at most B decoded together", "",
             "| B | method | gammas | tokens | wall s | total tok/s | SE speed-up vs ensemble at this B | "
             "ticks | forwards per model | acceptance per model |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        acc = " / ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_rate"])
        lines.append(f"| {r['batch']} | {r['method']} | {r['gammas'] or '-'} | {r['tokens']} | {r['wall_s']:.1f} "
                     f"| {r['tokens_per_s']:.2f} | {speed} | {r['ticks']} | {r['forwards']} | {acc} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    prompts = [t.prompt for t in humaneval_tasks(args.prompts)]
    params = [SamplingParams(temperature=1.0, seed=i, max_new_tokens=args.max_new_tokens) for i in range(len(prompts))]
    models = [load_model(name, max_batch=max(args.batches), max_len=1024) for name in (SMALL, LARGE)]
    spec = EnsembleSpec.weighted([0.5, 0.5])
    Engine(models, spec, "se").generate(prompts[0], SamplingParams(max_new_tokens=8, seed=0))  # warm-up
    result = {**header(), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": []}
    stem = f"batch-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    for batch in args.batches:
        baseline = None
        for method, gammas in RUNS:
            engine = Engine(models, spec, method, gammas, max_batch=batch)
            start = time.perf_counter()
            outputs = engine.generate(prompts, params, progress=True)
            wall = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outputs)
            accepted = [sum(o.metrics.drafts_accepted[m] for o in outputs) for m in range(2)]
            tested = [sum(o.metrics.drafts_tested[m] for o in outputs) for m in range(2)]
            baseline = baseline or tokens / wall
            result["rows"].append({
                "batch": batch, "method": method, "gammas": gammas, "tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "speedup": None if method == "ensemble" else tokens / wall / baseline,
                "ticks": engine.scheduler.stats.ticks, "forwards": engine.scheduler.stats.forwards,
                "acceptance_rate": [a / t if t else None for a, t in zip(accepted, tested)]})
            write_result(args.out, stem, result, markdown(result))


if __name__ == "__main__":
    main()
