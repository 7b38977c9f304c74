"""Speed-up of speculative ensembles over the standard ensemble on HumanEval prompts.

    python -m bench.speedup [--prompts 20] [--max-new-tokens 128] [--configs weighted-t1 ...]

The real pair (Qwen2.5-Coder 0.5B + 1.5B Instruct, bf16, batch 1) on the first --prompts HumanEval
prompts, raw code completion (no chat template), generation ending at EOS or --max-new-tokens.
For each ensemble config every method runs over the same prompts with the same per-prompt seeds;
tokens/s is total tokens over total wall time (prefill included), speed-up is against the
``ensemble`` row of the same config in the same run. Writes bench/results/speedup-<device>-<config>
.{md,json} after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from bench.datasets import humaneval_tasks
from bench.env import header, header_markdown
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.metrics import Metrics
from se_engine.runner import LoadedModel, load_model
from se_engine.sampling import SamplingParams

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"

# name -> (model order, ensemble, temperature, runs as (method, gammas in model order), time singles too).
# A single model's speed does not depend on the ensemble or the temperature: singles run once, at T = 1.
CONFIGS = {
    "weighted-t1": ((SMALL, LARGE), EnsembleSpec.weighted([0.5, 0.5]), 1.0,
                    [("ensemble_sd", [6, 1]), ("se", [4, 1]), ("se", [6, 1]), ("se", [8, 1])], True),
    "weighted-greedy": ((SMALL, LARGE), EnsembleSpec.weighted([0.5, 0.5]), 0.0,
                        [("ensemble_sd", [6, 1]), ("se", [6, 1])], False),
    "contrastive-greedy": ((LARGE, SMALL), EnsembleSpec.contrastive(0.1), 0.0,
                           [("ensemble_sd", [1, 6]), ("se", [1, 6])], False),
}


def run(engine: Engine, prompts: list[str], temperature: float, max_new_tokens: int, label: str) -> Metrics:
    total = Metrics.zeros(len(engine.models))
    for i, prompt in enumerate(tqdm(prompts, desc=label, leave=False)):
        params = SamplingParams(temperature=temperature, seed=i, max_new_tokens=max_new_tokens)
        total.add(engine.generate(prompt, params)[0].metrics)
    return total


def row(label: str, method: str, gammas: list[int] | None, m: Metrics, baseline: Metrics | None) -> dict:
    return {"label": label, "method": method, "gammas": gammas, **m.as_dict(),
            "speedup": m.tokens_per_s / baseline.tokens_per_s if baseline else None,
            "verify_share": m.verify_s / m.wall_s if m.wall_s else None}


def markdown(result: dict) -> str:
    """One config's result as a page: header, workload, one table."""
    name, rows = result["config"], result["rows"]
    order, _, temperature, _, _ = CONFIGS[name]
    lines = [f"# Speculative ensemble vs standard ensemble on HumanEval: {name}", "", header_markdown(result),
             f"- models in ensemble order: {', '.join(order)}; bf16, batch 1, native runner; T = {temperature}",
             f"- workload: first {result['prompts']} HumanEval prompts (raw completion), up to "
             f"{result['max_new_tokens']} new tokens, stop at EOS, seed = prompt index",
             *([f"- note: {result['note']}"] if result.get("note") else []), "",
             "| method | gammas | tokens | tok/s | speed-up vs ensemble | acceptance per model | "
             "accepted per verify | forwards per model | verify share of time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = " / ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_rate"])
        mean = "-" if r["mean_accepted_per_step"] is None else f"{r['mean_accepted_per_step']:.2f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        share = "-" if not r["verify_steps"] else f"{100 * r['verify_share']:.2f}%"
        lines.append(f"| {r['label']} | {r['gammas'] or '-'} | {r['tokens']} | {r['tokens_per_s']:.2f} | {speed} "
                     f"| {acc} | {mean} | {r['forwards']} | {share} |")
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path) -> None:
    stem = out / f"speedup-{'cuda' if torch.cuda.is_available() else 'cpu'}-{result['config']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--singles", action=argparse.BooleanOptionalAction, default=True,
                    help="also time each model alone where the config asks for it")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    prompts = [t.prompt for t in humaneval_tasks(args.prompts)]
    models: dict[str, LoadedModel] = {name: load_model(name, max_len=2048) for name in (SMALL, LARGE)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm = Engine([models[SMALL], models[LARGE]], None, "se")
    warm.generate(prompts[0], SamplingParams(max_new_tokens=8, seed=0))  # first-call allocations, thread pools
    for name in args.configs:
        order, spec, temperature, runs, with_singles = CONFIGS[name]
        loaded = [models[n] for n in order]
        result = {**header(), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "config": name,
                  "rows": []}
        baseline = run(Engine(loaded, spec, "ensemble"), prompts, temperature, args.max_new_tokens, f"{name} ensemble")
        result["rows"].append(row("ensemble", "ensemble", None, baseline, baseline))
        save(result, out)
        for method, gammas in runs:
            engine = Engine(loaded, spec, method, gammas)
            m = run(engine, prompts, temperature, args.max_new_tokens, f"{name} {method} {gammas}")
            result["rows"].append(row(method, method, gammas, m, baseline))
            save(result, out)
        for model_name, model in zip(order, loaded) if with_singles and args.singles else ():
            m = run(Engine([model], None, "single"), prompts, temperature, args.max_new_tokens, f"{name} {model_name}")
            result["rows"].append(row(f"single {model_name}", "single", None, m, baseline))
            save(result, out)
        print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
