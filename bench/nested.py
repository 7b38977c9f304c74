"""Nested early-exit drafts (S2D-style) against the plain small draft, for the large model alone and the ensemble.

    python -m bench.nested [--prompts 8] [--max-new-tokens 64] [--thresholds 0.9 0.7 0.5]

By default the real pair (Qwen2.5-Coder 0.5B, 24 layers, and 1.5B, 28 layers; bf16, batch 1), method
ensemble_sd, T = 1, seed = prompt index, the first --prompts HumanEval prompts. Targets: the large
model alone and the small + large weighted 0.5 / 0.5 ensemble. Drafts: the full small model (for the
ensemble: the member itself proposes), and NestedDrafter views of the small and of the large model
at a quarter, half, three quarters and all of their layers (0.5B: 6/12/18/24, 1.5B: 7/14/21/28), at
each --thresholds value t (the same t at every depth but the last). Each target's baseline runs
without speculation (single / ensemble). Every run of a prompt is timed alone (bench.env.run_alone).
-> bench/results/nested-<device>.{md,json}

These models were not trained for early exit (S2D's were): their shallow views are poor language
models, so what the numbers show is how much of that the exit rule can avoid.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from bench.datasets import humaneval_tasks
from bench.env import header, header_markdown, run_alone, write_result
from bench.speedup import LARGE, SMALL
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.metrics import Metrics
from se_engine.nested import NestedDrafter
from se_engine.runner import LoadedModel, load_model
from se_engine.sampling import SamplingParams

GAMMA = 4


def quarters(model: LoadedModel) -> list[int]:
    """Exit depths at a quarter, a half, three quarters and all of the model's layers."""
    layers = model.runner.cfg.num_layers
    return sorted({max(1, layers * i // 4) for i in range(1, 5)})


def configs(small: LoadedModel, large: LoadedModel, thresholds: list[float]):
    """(target, draft label, engine factory) for every run; drafters are built fresh per run, so
    their exit counters are that run's."""
    ens = EnsembleSpec.weighted([0.5, 0.5])
    targets = {"large": ([large], None), "small + large": ([small, large], ens)}
    for target, (members, spec) in targets.items():
        n = len(members)
        yield target, "none (baseline)", lambda m=members, s=spec: Engine(m, s, "single" if len(m) == 1 else "ensemble")
        if n == 1:
            yield target, "small", lambda m=members: Engine(m, None, "ensemble_sd", [1, GAMMA], drafter=small.runner)
        else:
            yield target, "small", lambda m=members, s=spec: Engine(m, s, "ensemble_sd", [GAMMA, 1])
        for model in (small, large):
            for t in thresholds:
                depths = quarters(model)
                label = f"nested {'small' if model is small else 'large'} {depths} t={t}"
                yield target, label, lambda m=members, s=spec, model=model, d=depths, t=t: Engine(
                    m, s, "ensemble_sd", [1] * n + [GAMMA],
                    drafter=NestedDrafter(model.runner, d, [t] * (len(d) - 1)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    ap.add_argument("--models", nargs=2, default=[SMALL, LARGE], metavar=("SMALL", "LARGE"))
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    prompts = [t.prompt for t in humaneval_tasks(args.prompts)]
    small, large = (load_model(n, max_len=2048) for n in args.models)
    result = {**header(), "models": args.models, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "gamma": GAMMA, "rows": []}
    stem = f"nested-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    baseline: dict[str, float] = {}
    for target, draft, make in configs(small, large, args.thresholds):
        engine = make()
        engine.generate(prompts[0], SamplingParams(max_new_tokens=4, seed=0))  # warm-up
        total, start = Metrics.zeros(len(engine.runner_names)), time.perf_counter()
        for i, prompt in enumerate(tqdm(prompts, desc=f"{target}: {draft}", leave=False)):
            params = SamplingParams(temperature=1.0, seed=i, max_new_tokens=args.max_new_tokens)
            total.add(run_alone(lambda: engine.generate(prompt, params)[0].metrics)[0])
        rate = total.tokens_per_s
        baseline.setdefault(target, rate)
        drafter = engine.drafter
        result["rows"].append({
            "target": target, "draft": draft, **total.as_dict(), "speedup": rate / baseline[target],
            "exits": drafter.exits if isinstance(drafter, NestedDrafter) else None,
            "run_s": time.perf_counter() - start})
        write_result(args.out, stem, result, markdown(result))


def markdown(result: dict) -> str:
    lines = ["# Nested early-exit drafts vs the plain small-model draft", "", header_markdown(result),
             f"- models: small {result['models'][0]}, large {result['models'][1]}; bf16, batch 1; method ensemble_sd, "
             f"{result['gamma']} drafts per proposal, T = 1",
             f"- workload: first {result['prompts']} HumanEval prompts, up to {result['max_new_tokens']} new tokens, "
             "seed = prompt index; each prompt's run timed on a quiet machine",
             "- exits: drafted rows that left at each depth (nested drafts only)", "",
             "| target | draft | tok/s | speed-up vs no speculation | acceptance of the draft | accepted per verify "
             "| exits per depth |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tested, accepted = sum(r["drafts_tested"]), sum(r["drafts_accepted"])
        acc = f"{accepted / tested:.2f}" if tested else "-"
        per = "-" if r["mean_accepted_per_step"] is None else f"{r['mean_accepted_per_step']:.2f}"
        lines.append(f"| {r['target']} | {r['draft']} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {acc} "
                     f"| {per} | {r['exits'] or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
