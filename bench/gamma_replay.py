"""Draft-length policies replayed on recorded acceptance traces: compare and tune them without rerunning models.

    python -m bench.gamma_replay record [--prompts 16] [--max-new-tokens 128]
    python -m bench.gamma_replay replay [--seeds 20]

Why a replay is faithful. se's output distribution does not depend on the draft lengths, so one
sample of the ensemble serves every policy. Given the token x_t emitted at position t, a draft of
model m there was accepted with probability beta_m(t) = min(q_m(x_t), r(x_t)) / r(x_t) (as
P(accept, emit x) = min(q_m, r)(x) and P(emit x) = r(x)), independently of the other positions. A
policy run on the sample is then a walk over the positions with one coin per position: a draft of m
at t is accepted iff u_t < beta_m(t), and every policy sees the same coins (common random numbers:
the comparison's noise is the sample's, not the coins'). Time is the cycle's forwards priced with
the forward costs measured at record time (c(k) = fixed + per token, as in se_engine.gamma);
prefill and per-step overheads are left out, so the rates are a model's, their ratios the point.

record: the real pair, weighted 0.5 / 0.5 at T = 1, bf16, batch 1; the first --prompts HumanEval and
GSM8K prompts (bench.datasets); one se generation each (seed = index), then one forward of each model
over prompt + generation gives beta_small, beta_large at every generated position.
-> bench/results/acceptance-traces-<device>.json
replay: fixed [g, 1] and [g, 2] and automatic policies on HumanEval, GSM8K and both (mixed), each
over --seeds coin draws. -> bench/results/gamma-replay-<device>.{md,json}
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from bench.datasets import gsm8k_tasks, humaneval_tasks
from bench.env import header, header_markdown, run_alone, write_result
from bench.speedup import LARGE, SMALL
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import (DECAY, MAX_GAMMA, PRIOR, AutoGammas, DraftLengths, FixedGammas, ForwardCost, cycle_rate,
                             measure_costs)
from se_engine.runner import load_model
from se_engine.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRACES = Path("bench/results") / f"acceptance-traces-{DEVICE}.json"


def record(prompts: int, max_new_tokens: int, traces_path: Path) -> None:
    models = [load_model(name, max_len=2048) for name in (SMALL, LARGE)]
    runners = [m.runner for m in models]
    costs = run_alone(lambda: measure_costs(runners, slot=0, max_k=MAX_GAMMA + 1))[0]
    engine = Engine(models, EnsembleSpec.weighted([0.5, 0.5]), "se", [6, 1])
    traces: dict[str, list[list[list[float]]]] = {}
    for dataset, load in (("HumanEval", humaneval_tasks), ("GSM8K", gsm8k_tasks)):
        for i, task in enumerate(tqdm(load(prompts), desc=dataset)):
            params = SamplingParams(temperature=1.0, seed=i, max_new_tokens=max_new_tokens)
            generated = engine.generate(task.prompt, params)[0].token_ids
            ids = engine.encode(task.prompt) + generated
            probs = []
            for runner in runners:  # logits at positions prompt - 1 .. end - 2 predict the generated tokens
                runner.truncate([0], [0])
                probs.append(runner.forward([0], [ids[:-1]], [len(generated)]).softmax(-1))
                runner.truncate([0], [0])
            x = torch.tensor(generated)[:, None]
            p = [q.gather(1, x)[:, 0] for q in probs]
            r = 0.5 * (p[0] + p[1])
            traces.setdefault(dataset, []).append([(torch.minimum(q, r) / r).tolist() for q in p])
    traces_path.write_text(json.dumps({**header(), "models": [SMALL, LARGE], "max_new_tokens": max_new_tokens,
                                  "costs": [asdict(c) for c in costs], "traces": traces}))
    print(f"wrote {traces_path}")


def simulate(policy: DraftLengths, betas: list[list[float]], coins: list[float],
             costs: list[ForwardCost]) -> tuple[float, list[int]]:
    """Modelled seconds for se to emit one trace (model 0, the small one, proposes first), and the
    small model's draft lengths. Position 0 comes with the prefill; then, as in decode.Scheduler: m drafts g
    (its first draft free if it just scored a fully accepted proposal), the other model scores them in
    one forward over g + 1 tokens; after a rejection the small model proposes again, after a full
    accept the scorer does, its first draft free."""
    acceptance = [[0.0, 0.0], [0.0, 0.0]]
    t, m, free, seconds, lengths = 1, 0, False, 0.0, []
    while t < len(coins):
        o = 1 - m
        g = max(1, min(policy.choose(m, acceptance[m], free, {o: 1}, "se"), len(coins) - t))
        if m == 0:
            lengths.append(g)
        seconds += (g - free) * costs[m](1) + costs[o](g + 1)
        a = 0
        while a < g and coins[t + a] < betas[m][t + a]:
            a += 1
        policy.observe(acceptance[m], min(g, a + 1), a)
        t, m, free = (t + a + 1, 0, False) if a < g else (t + g, o, True)
    return seconds, lengths


class CycleGammas(AutoGammas):
    """A candidate rule: the small model's gamma maximises the whole alternate-proposal cycle's rate
    (se_engine.gamma.cycle_rate, the large model drafting 1), taking the smoothed acceptance for both
    proposers (for a 0.5 / 0.5 weighted ensemble both accept with 1 - TV(p_small, p_large) / 2)."""

    def choose(self, m: int, acceptance: list[float], free: bool, scorers: dict[int, int], method: str) -> int:
        if m != 0:
            return 1
        a = self.estimate(acceptance)
        return max(range(1, self.max_gamma + 1), key=lambda g: cycle_rate("se", self.costs, [g, 1], [a, a]))


def policies(costs: list[ForwardCost]) -> dict[str, DraftLengths]:
    fixed = {f"fixed {[g, h]}": FixedGammas([g, h]) for h in (1, 2) for g in range(1, 11)}
    auto = {f"{name} prior {prior} decay {decay}": rule(costs, prior=prior, decay=decay)
            for name, rule in (("auto", AutoGammas), ("cycle", CycleGammas))
            for prior in (PRIOR, (0.9, 4.0)) for decay in (0.5, DECAY, 0.9, 0.95, 0.99)}
    return fixed | auto


def replay(seeds: int, traces_path: Path, out: str) -> None:
    data = json.loads(traces_path.read_text())
    costs = [ForwardCost(**c) for c in data["costs"]]
    workloads = {**data["traces"], "mixed": [t for traces in data["traces"].values() for t in traces]}
    candidates = policies(costs)
    result = {**header(), "traces": {k: len(v) for k, v in data["traces"].items()}, "record": {
        k: data[k] for k in ("command", "machine", "date", "max_new_tokens", "costs")}, "seeds": seeds, "workloads": {}}
    for workload, traces in workloads.items():
        rows = []
        for name, policy in candidates.items():
            tokens, seconds, lengths = 0, 0.0, []
            for s in range(seeds):
                for i, betas in enumerate(traces):
                    coins = random.Random(f"{s}/{workload}/{i}").random  # same coins for every policy
                    sec, ls = simulate(policy, betas, [coins() for _ in betas[0]], costs)
                    tokens, seconds, lengths = tokens + len(betas[0]) - 1, seconds + sec, lengths + ls
            rows.append({"policy": name, "tokens_per_s": tokens / seconds,
                         "mean_draft_length": sum(lengths) / len(lengths)})
        best = max((r for r in rows if r["policy"].startswith("fixed")), key=lambda r: r["tokens_per_s"])
        for r in rows:
            r["vs_best_fixed"] = r["tokens_per_s"] / best["tokens_per_s"]
        result["workloads"][workload] = rows
    write_result(out, f"gamma-replay-{DEVICE}", result, markdown(result))


def markdown(result: dict) -> str:
    rec = result["record"]
    costs = ", ".join(f"{c['fixed_s'] * 1e3:.1f} ms + {c['per_token_s'] * 1e3:.2f} ms/token" for c in rec["costs"])
    lines = ["# Draft-length policies replayed on recorded acceptance traces", "", header_markdown(result),
             f"- traces: `{rec['command']}` on {rec['machine']}, {rec['date']}: "
             f"{', '.join(f'{n} {k}' for k, n in result['traces'].items())} generations of up to "
             f"{rec['max_new_tokens']} tokens; forward costs (small, large): {costs}",
             f"- {result['seeds']} coin draws per trace; rates are modelled (forwards priced by the costs), "
             "so compare ratios", ""]
    for workload, rows in result["workloads"].items():
        lines += [f"## {workload}", "", "| policy | modelled tok/s | vs best fixed | small model's mean draft length |",
                  "|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['tokens_per_s']:.2f} | {r['vs_best_fixed']:.3f} "
                  f"| {r['mean_draft_length']:.2f} |"
                  for r in sorted(rows, key=lambda r: -r["tokens_per_s"])]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=TRACES)
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--prompts", type=int, default=16)
    rec.add_argument("--max-new-tokens", type=int, default=128)
    rep = sub.add_parser("replay")
    rep.add_argument("--seeds", type=int, default=20)
    rep.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if args.command == "record":
        record(args.prompts, args.max_new_tokens, args.traces)
    else:
        replay(args.seeds, args.traces, args.out)


if __name__ == "__main__":
    main()
