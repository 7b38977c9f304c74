"""Automatic draft lengths against a sweep of fixed ones, per workload.

    python -m bench.gammas [--prompts 8] [--max-new-tokens 64] [--workloads HumanEval GSM8K mixed]

The real pair (Qwen2.5-Coder 0.5B + 1.5B Instruct, bf16, batch 1), weighted 0.5/0.5 at T = 1, method
``se``. Workloads: the first --prompts HumanEval prompts (raw completion), the first --prompts GSM8K
test questions after the few-shot prefix, and a mixed one alternating the two (half of each). Every
setting runs over the same prompts with the same seeds; tokens/s is total tokens over total wall time
(prefill included). ``auto`` measures the forward costs once at start-up (recorded in the result) and
uses the same costs for every workload. Writes bench/results/gammas-<device>.{md,json} after every row
(gammas-<device>-<workloads>.{md,json} when --workloads names a subset).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from bench.env import header, header_markdown, write_result
from bench.datasets import gsm8k_tasks, humaneval_tasks
from bench.speedup import LARGE, SMALL
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import MAX_GAMMA, AutoGammas, measure_costs
from se_engine.metrics import Metrics
from se_engine.runner import load_model
from se_engine.sampling import SamplingParams

FIXED = [[2, 1], [4, 1], [6, 1], [8, 1], [6, 2]]


def run(engine: Engine, prompts: list[str], max_new_tokens: int, label: str) -> Metrics:
    total = Metrics.zeros(len(engine.models))
    for i, prompt in enumerate(tqdm(prompts, desc=label, leave=False)):
        params = SamplingParams(temperature=1.0, seed=i, max_new_tokens=max_new_tokens)
        total.add(engine.generate(prompt, params)[0].metrics)
    return total


def markdown(result: dict) -> str:
    costs = ", ".join(f"{name}: {c['fixed_s'] * 1e3:.1f} ms + {c['per_token_s'] * 1e3:.2f} ms/token"
                      for name, c in zip((SMALL, LARGE), result["costs"]))
    lines = ["# Automatic draft lengths vs a sweep of fixed ones", "", header_markdown(result),
             f"- models: {SMALL} + {LARGE}, weighted 0.5/0.5, T = 1, bf16, batch 1, method se",
             f"- workload: first {result['prompts']} prompts per dataset (mixed: alternating HumanEval and GSM8K, "
             f"{result['prompts']} in all), up to {result['max_new_tokens']} new tokens, stop at EOS, seed = prompt index",
             f"- auto: costs measured once at start-up: {costs}; at most {MAX_GAMMA} drafts", ""]
    for workload, rows in result["workloads"].items():
        best = max((r for r in rows if r["gammas"] != "auto"), key=lambda r: r["tokens_per_s"], default=None)
        lines += [f"## {workload}", "", "| gammas | tokens | tok/s | vs best fixed | mean draft length per model | "
                  "acceptance per model |", "|---|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['tokens_per_s'] / best['tokens_per_s']:.3f}" if best else "-"
            mean = " / ".join("-" if g is None else f"{g:.2f}" for g in r["mean_draft_length"])
            acc = " / ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_rate"])
            lines.append(f"| {r['gammas']} | {r['tokens']} | {r['tokens_per_s']:.2f} | {ratio} | {mean} | {acc} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--workloads", nargs="+", choices=["HumanEval", "GSM8K", "mixed"],
                    default=["HumanEval", "GSM8K", "mixed"])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    he, gsm = ([t.prompt for t in load(args.prompts)] for load in (humaneval_tasks, gsm8k_tasks))
    half = args.prompts // 2
    workloads = {"HumanEval": he, "GSM8K": gsm, "mixed": [p for pair in zip(he[:half], gsm[:half]) for p in pair]}
    workloads = {name: prompts for name, prompts in workloads.items() if name in args.workloads}
    models = [load_model(name, max_len=2048) for name in (SMALL, LARGE)]
    spec = EnsembleSpec.weighted([0.5, 0.5])
    Engine(models, spec, "se").generate(he[0], SamplingParams(max_new_tokens=8, seed=0))  # warm-up
    auto = AutoGammas(measure_costs([m.runner for m in models], slot=0, max_k=MAX_GAMMA + 1))
    result = {**header(), "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "costs": [asdict(c) for c in auto.costs], "workloads": {}}
    stem = f"gammas-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    if len(workloads) < 3:
        stem += "-" + "-".join(workloads)
    for workload, prompts in workloads.items():
        rows = result["workloads"].setdefault(workload, [])
        for gammas in [*FIXED, "auto"]:
            start = time.perf_counter()
            m = run(Engine(models, spec, "se", auto if gammas == "auto" else gammas), prompts,
                    args.max_new_tokens, f"{workload} {gammas}")
            rows.append({"gammas": gammas, **m.as_dict(), "run_s": time.perf_counter() - start})
            write_result(args.out, stem, result, markdown(result))


if __name__ == "__main__":
    main()
