"""Multi-target serving: the larger model alone and the small + large ensemble through one engine
with one proposer, vs two separate engines run one after the other on the same requests.

    python -m bench.multi_target [--prompts 16] [--max-new-tokens 64] [--gamma 4] [--batch 8]
                                 [--nested 6 12 24 --threshold 0.8] [--models SMALL LARGE] [--no-alone]

The real pair by default (Qwen2.5-Coder 0.5B + 1.5B Instruct, bf16, native runner). Requests: the
first --prompts HumanEval prompts (raw completion, stop at EOS or --max-new-tokens, T = --temperature,
seed = prompt index); prompt i asks for target "large" (the larger model alone) when i is even, for
"ensemble" (weighted 0.5 / 0.5) when odd. Method ensemble_sd with one proposer for both targets:
the small model as a plain draft model (default; a member of the ensemble, outside "large"), or with
--nested a ``NestedDrafter`` of the small model at those depths (exit threshold --threshold).

    one engine    Engine(targets={"large", "ensemble"}): every request submitted at once, at most
                  --batch decoded together; the proposer's forwards batch the drafts of both targets
    two engines   an engine per target with the same proposer and gammas, each given its own requests
                  (same --batch), the second after the first

Total tokens/s: all emitted tokens over the wall time (prefill included; two engines: the sum of both
runs). Seeded randomness makes each request's tokens the same in both setups; the report counts the
requests where they are. Each run is timed alone (bench.env.run_alone) unless --no-alone. Writes
bench/results/multi-target-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.datasets import humaneval_tasks
from bench.env import header, header_markdown, run_alone, write_result
from bench.speedup import LARGE, SMALL
from se_engine.engine import Engine, GenerationResult
from se_engine.ensemble import EnsembleSpec
from se_engine.nested import NestedDrafter
from se_engine.runner import LoadedModel, Runner, load_model
from se_engine.sampling import SamplingParams

TARGETS = {"large": ([1], None), "ensemble": ([0, 1], EnsembleSpec.weighted([0.5, 0.5]))}  # over [small, large]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def counters(engine: Engine) -> list[float]:
    """[ticks, proposer forwards, verify calls] so far."""
    stats = engine.scheduler.stats
    return [stats.ticks, stats.forwards[engine.order[0]], stats.verify_calls]


def run(engine: Engine, prompts: list[str], params: list[SamplingParams], targets: list[str] | None,
        alone: bool) -> tuple[list[GenerationResult], list[float]]:
    """engine.generate over the requests, timed (alone: on a quiet machine); returns the results and
    [wall s, ticks, proposer forwards, verify calls] of the (last) run."""
    def timed() -> tuple[list[GenerationResult], list[float]]:
        before, start = counters(engine), time.perf_counter()
        results = engine.generate(prompts, params, targets)
        wall = time.perf_counter() - start
        return results, [wall, *(b - a for a, b in zip(before, counters(engine)))]

    return run_alone(timed)[0] if alone else timed()


def row(name: str, results: list[GenerationResult], totals: list[float]) -> dict:
    """One setup's line of the report; totals: [wall s, ticks, proposer forwards, verify calls]."""
    tokens = sum(len(r.token_ids) for r in results)
    wall, ticks, forwards, verifies = totals
    return {"setup": name, "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ticks": ticks, "proposer_forwards": forwards, "verify_calls": verifies}


def markdown(result: dict) -> str:
    one, two = result["rows"]
    proposer = (f"NestedDrafter of the small model, depths {result['nested']}, threshold {result['threshold']}"
                if result["nested"] else "the small model (plain draft model)")
    lines = ["# Multi-target serving: one engine and one proposer vs an engine per target", "",
             header_markdown(result),
             f"- models: {result['models'][0]} (small) + {result['models'][1]} (large), {result['dtype']}, "
             "native runner",
             f"- targets: large alone; ensemble = small + large weighted 0.5/0.5; method ensemble_sd, proposer: "
             f"{proposer}, gamma {result['gamma']}",
             f"- workload: first {result['prompts']} HumanEval prompts, alternately for large and ensemble; up to "
             f"{result['max_new_tokens']} new tokens, T = {result['temperature']}, seed = prompt index; at most "
             f"{result['batch']} decoded together", "",
             "| setup | requests | tokens | wall s | total tok/s | ticks | proposer forwards | verify calls |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setup']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.2f} "
                     f"| {r['ticks']} | {r['proposer_forwards']} | {r['verify_calls']} |")
    lines += ["", f"- one engine vs two: {one['tokens_per_s'] / two['tokens_per_s']:.2f}x total tokens/s",
              f"- outputs identical in both setups on {result['identical']} of {one['requests']} requests "
              f"({result['dtype']}: a forward's rounding depends on the rows it carries, so a sampled token at a "
              "near-tie can differ between setups; per-request identity in fp32 is what tests/test_multi_target.py "
              "shows)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs=2, default=[SMALL, LARGE], metavar=("SMALL", "LARGE"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gamma", type=int, default=4, help="the proposer's draft length")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded at once, in each engine")
    ap.add_argument("--nested", type=int, nargs="+", default=None, metavar="DEPTH",
                    help="propose with early-exit views of the small model at these depths")
    ap.add_argument("--threshold", type=float, default=0.8, help="exit threshold of every nested depth but the last")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--alone", action=argparse.BooleanOptionalAction, default=True,
                    help="time each run on a quiet machine, redoing runs that shared the CPU (bench.env.run_alone)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    tasks = humaneval_tasks(args.prompts)
    prompts = [t.prompt for t in tasks]
    params = [SamplingParams(temperature=args.temperature, seed=i, max_new_tokens=args.max_new_tokens)
              for i in range(len(prompts))]
    targets = [("large", "ensemble")[i % 2] for i in range(len(prompts))]
    models: list[LoadedModel] = [load_model(name, device=device(), max_batch=args.batch, max_len=args.max_len)
                                 for name in args.models]
    small, large = models

    def proposer() -> Runner | None:
        """A fresh nested drafter per engine (its own cache), or None: the small model proposes."""
        if args.nested is None:
            return None
        return NestedDrafter(small.runner, args.nested, [args.threshold] * (len(args.nested) - 1))

    def engine(members: list[LoadedModel], **kwargs) -> Engine:
        drafter = proposer()
        if drafter is None and not any(m is small for m in members):
            drafter = small.runner  # the plain draft model, outside this engine's only target
        proposes = [m is small and drafter is None for m in members] + [True] * (drafter is not None)
        gammas = [args.gamma if p else 1 for p in proposes]
        return Engine(members, method="ensemble_sd", gammas=gammas, proposer_order=list(range(len(members))),
                      max_batch=args.batch, drafter=drafter, **kwargs)

    one = engine(models, targets=TARGETS)
    apart = {"large": engine([large]), "ensemble": engine(models, ensemble=TARGETS["ensemble"][1])}
    warm = SamplingParams(max_new_tokens=8, seed=0)
    one.generate([prompts[0]] * 2, warm, list(TARGETS))
    for e in apart.values():
        e.generate(prompts[0], warm)

    results, totals = run(one, prompts, params, targets, args.alone)
    separate: list[GenerationResult | None] = [None] * len(prompts)
    separate_totals = [0.0, 0, 0, 0]
    for name, e in apart.items():
        mine = [i for i, t in enumerate(targets) if t == name]
        out, own = run(e, [prompts[i] for i in mine], [params[i] for i in mine], None, args.alone)
        separate_totals = [a + b for a, b in zip(separate_totals, own)]
        for i, r in zip(mine, out):
            separate[i] = r
    result = {**header(), "models": args.models, "dtype": str(small.runner.k_cache.dtype).removeprefix("torch."),
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "gamma": args.gamma, "batch": args.batch, "nested": args.nested,
              "threshold": args.threshold if args.nested else None,
              "identical": sum(a.token_ids == b.token_ids for a, b in zip(results, separate)),
              "rows": [row("one engine, both targets", results, totals),
                       row("two engines, one per target", separate, separate_totals)]}
    write_result(args.out, f"multi-target-{device()}", result, markdown(result))


if __name__ == "__main__":
    main()
