"""Draft-length policies replayed on recorded acceptance traces: compare and tune them without rerunning models.

    python -m bench.gamma_replay record [--prompts 16] [--max-new-tokens 128]
    python -m bench.gamma_replay replay [--seeds 20]

Why a replay is faithful. The output distribution does not depend on the draft lengths, so one
sample of the ensemble serves every policy. Given the token x_t emitted at position t, a draft of
model m there was accepted with probability beta_m(t) = min(q_m(x_t), r(x_t)) / r(x_t) (as
P(accept, emit x) = min(q_m, r)(x) and P(emit x) = r(x)), independently of the other positions. A
policy run on the sample is then a walk over the positions with one coin per position: a draft of m
at t is accepted iff u_t < beta_m(t), and every policy sees the same coins (common random numbers:
the comparison's noise is the sample's, not the coins'). A proposal ends early after a draft whose
proposer's top probability (the recorded confidence) is below the threshold, as in the engine.
Time is the cycle's forwards priced with the forward costs measured at record time (c(k) = fixed +
per token, as in se_engine.gamma); prefill and per-step overheads are left out, so the rates are a
model's, their ratios the point.

record: the real pair, weighted 0.5 / 0.5 at T = 1, bf16, batch 1; the first --prompts HumanEval and
GSM8K prompts (bench.datasets); one se generation each (seed = index), then one forward of the small
model, the large one and an int4 copy of the small one (se_engine.quant) over prompt + generation
gives each one's beta and confidence at every generated position.
-> bench/results/acceptance-traces-<device>.json
replay: two methods, each with fixed draft lengths, the engine's automatic rule (and, for se, a
cycle-level variant) under a few priors and decays, each at confidence thresholds THRESHOLDS (0: off):
se (the pair, the small model first) and sd-int4 (ensemble_sd, the int4 copy drafting); on HumanEval,
GSM8K and both (mixed), each over --seeds coin draws. -> bench/results/gamma-replay-<device>.{md,json}
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
from se_engine.methods import POLICIES, Method
from se_engine.runner import load_model
from se_engine.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRACES = Path("bench/results") / f"acceptance-traces-{DEVICE}.json"


def record(prompts: int, max_new_tokens: int, traces_path: Path) -> None:
    models = [load_model(name, max_len=2048) for name in (SMALL, LARGE)]
    drafter = load_model(SMALL, max_len=2048, quantize="int4").runner
    runners = [m.runner for m in models]
    costs = run_alone(lambda: measure_costs(runners, slot=0, max_k=MAX_GAMMA + 1)
                      + measure_costs([drafter], slot=0, max_k=2))[0]
    engine = Engine(models, EnsembleSpec.weighted([0.5, 0.5]), "se", [6, 1])
    traces: dict[str, list[dict[str, list[list[float]]]]] = {}
    for dataset, load in (("HumanEval", humaneval_tasks), ("GSM8K", gsm8k_tasks)):
        for i, task in enumerate(tqdm(load(prompts), desc=dataset)):
            params = SamplingParams(temperature=1.0, seed=i, max_new_tokens=max_new_tokens)
            generated = engine.generate(task.prompt, params)[0].token_ids
            ids = engine.encode(task.prompt) + generated
            probs = []
            for runner in [*runners, drafter]:  # logits at positions prompt - 1 .. end - 2 predict the generated tokens
                runner.truncate([0], [0])
                probs.append(runner.forward([0], [ids[:-1]], [len(generated)]).float().softmax(-1))
                runner.truncate([0], [0])
            x = torch.tensor(generated)[:, None]
            p = [q.gather(1, x)[:, 0] for q in probs]
            r = 0.5 * (p[0] + p[1])
            traces.setdefault(dataset, []).append({"beta": [(torch.minimum(q, r) / r).tolist() for q in p],
                                                   "confidence": [q.amax(-1).tolist() for q in probs]})
    traces_path.write_text(json.dumps({**header(), "models": [SMALL, LARGE, f"{SMALL} (int4)"],
                                       "max_new_tokens": max_new_tokens,
                                       "costs": [asdict(c) for c in costs], "traces": traces}))
    print(f"wrote {traces_path}")


Trace = dict[str, list[list[float]]]  # "beta", "confidence": [runner][position]
THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SMALL_M, LARGE_M, DRAFTER = 0, 1, 2  # runner indices in a trace


def propose(m: int, g: int, t: int, trace: Trace, coins: list[float], threshold: float) -> tuple[int, int]:
    """Model m's proposal of up to g drafts from position t: (drafts made, drafts accepted). It ends
    after a draft whose confidence is below the threshold (se_engine.decode). The recorded
    confidence is the proposer's on the emitted prefix, exact up to the first rejected draft; the
    drafts after it are void whatever their number, which only their cost depends on."""
    beta, confidence = trace["beta"][m], trace["confidence"][m]
    length = next((j + 1 for j in range(g) if confidence[t + j] < threshold), g)
    a = 0
    while a < length and coins[t + a] < beta[t + a]:
        a += 1
    return length, a


def simulate_se(policy: DraftLengths, threshold: float, trace: Trace, coins: list[float],
                costs: list[ForwardCost]) -> tuple[float, list[int]]:
    """Modelled seconds for se to emit one trace (model 0, the small one, proposes first), and the
    small model's draft lengths. Position 0 comes with the prefill; then, as in decode.Scheduler: m drafts g
    (its first draft free if it just scored a fully accepted proposal), the other model scores them in
    one forward over g + 1 tokens; after a rejection the small model proposes again, after a full
    accept the scorer does, its first draft free."""
    acceptance = [[0.0, 0.0], [0.0, 0.0]]
    t, m, free, seconds, lengths = 1, SMALL_M, False, 0.0, []
    while t < len(coins):
        o = 1 - m
        g = max(1, min(policy.choose(m, acceptance[m], free, {o: 1}, POLICIES["se"]), len(coins) - t))
        g, a = propose(m, g, t, trace, coins, threshold)
        if m == SMALL_M:
            lengths.append(g)
        seconds += (g - free) * costs[m](1) + costs[o](g + 1)
        policy.observe(acceptance[m], min(g, a + 1), a)
        t, m, free = (t + a + 1, SMALL_M, False) if a < g else (t + g, o, True)
    return seconds, lengths


def simulate_sd(policy: DraftLengths, threshold: float, trace: Trace, coins: list[float],
                costs: list[ForwardCost]) -> tuple[float, list[int]]:
    """The same for ensemble_sd with the int4 drafter (runner 2) proposing: both models score its g
    drafts in a forward over g + 1 tokens each; after a full accept r draws one more token and the
    drafter feeds its last draft with it (se_engine.gamma.cycle_rate)."""
    acceptance = [0.0, 0.0]
    t, seconds, lengths = 1, 0.0, []
    while t < len(coins):
        g = max(1, min(policy.choose(DRAFTER, acceptance, False, {SMALL_M: 1, LARGE_M: 1},
                                     POLICIES["ensemble_sd"]), len(coins) - t))
        g, a = propose(DRAFTER, g, t, trace, coins, threshold)
        lengths.append(g)
        full = a == g
        seconds += (g * costs[DRAFTER](1) + full * (costs[DRAFTER](2) - costs[DRAFTER](1))
                    + costs[SMALL_M](g + 1) + costs[LARGE_M](g + 1))
        policy.observe(acceptance, min(g, a + 1), a)
        t += a + 1
    return seconds, lengths


class CycleGammas(AutoGammas):
    """A candidate rule: the small model's gamma maximises the whole alternate-proposal cycle's rate
    (se_engine.gamma.cycle_rate, the large model drafting 1), taking the smoothed acceptance for both
    proposers (for a 0.5 / 0.5 weighted ensemble both accept with 1 - TV(p_small, p_large) / 2)."""

    def choose(self, m: int, acceptance: list[float], free: bool, scorers: dict[int, int], method: Method) -> int:
        if m != SMALL_M:
            return 1
        a = self.estimate(acceptance)
        return max(range(1, self.max_gamma + 1), key=lambda g: cycle_rate("se", self.costs[:2], [g, 1], [a, a]))


def policies(method: str, costs: list[ForwardCost]) -> dict[str, DraftLengths]:
    """Draft-length rules by name: fixed settings (se: [small, large]; sd: the drafter's), the engine's
    auto rule under a few priors and decays, and for se the cycle rule."""
    if method == "se":
        fixed = {f"fixed {[g, h]}": FixedGammas([g, h]) for h in (1, 2) for g in range(1, 11)}
    else:
        fixed = {f"fixed {g}": FixedGammas([1, 1, g]) for g in range(1, 17)}
    rules = (("auto", AutoGammas), ("cycle", CycleGammas)) if method == "se" else (("auto", AutoGammas),)
    auto = {f"{name} prior {prior} decay {decay}": rule(costs, prior=prior, decay=decay)
            for name, rule in rules for prior in (PRIOR, (0.9, 4.0)) for decay in (0.5, DECAY, 0.9)}
    return fixed | auto


SIMULATE = {"se": simulate_se, "sd-int4": simulate_sd}


DEFAULT_RULE = f"auto prior {PRIOR} decay {DECAY}"  # the engine's gammas="auto"
RESAMPLES = 1000


def replay(seeds: int, traces_path: Path, out: str) -> None:
    """Every (rule, threshold) on every trace under the same coins. The mixed workload is the union
    of the datasets' traces (sequences keep their own acceptance state, so its totals are the sums).
    How much of a margin is the sample's: a bootstrap over the mixed workload's traces gives the
    engine's rule over the best fixed setting (chosen again in each resample, which favours it)."""
    data = json.loads(traces_path.read_text())
    costs = [ForwardCost(**c) for c in data["costs"]]
    traces = [(d, i, trace) for d, ts in data["traces"].items() for i, trace in enumerate(ts)]
    result = {**header(), "traces": {k: len(v) for k, v in data["traces"].items()}, "record": {
        k: data[k] for k in ("command", "machine", "date", "max_new_tokens", "costs", "models")},
        "seeds": seeds, "thresholds": THRESHOLDS, "methods": {}, "bootstrap": {}}
    coins = {(d, i): [[random.Random(f"{s}/{d}/{i}").random() for _ in trace["beta"][0]] for s in range(seeds)]
             for d, i, trace in traces}
    rng = random.Random(0)
    resamples = [[rng.randrange(len(traces)) for _ in traces] for _ in range(RESAMPLES)]
    for method, simulate in SIMULATE.items():
        # (policy, threshold) -> per trace [tokens, seconds, drafts, proposals] over the seeds
        per_trace: dict[tuple[str, float], list[list[float]]] = {}
        for name, policy in tqdm(policies(method, costs).items(), desc=method):
            for threshold in THRESHOLDS:
                rows = per_trace[name, threshold] = []
                for d, i, trace in traces:
                    row = [0, 0.0, 0, 0]
                    for cs in coins[d, i]:
                        sec, lengths = simulate(policy, threshold, trace, cs, costs)
                        for k, v in enumerate((len(cs) - 1, sec, sum(lengths), len(lengths))):
                            row[k] += v
                    rows.append(row)
        workloads = {**{d: [j for j, t in enumerate(traces) if t[0] == d] for d in data["traces"]},
                     "mixed": list(range(len(traces)))}
        result["methods"][method] = {w: [{"policy": name, "threshold": th, "tokens_per_s": _rate(rows, idx),
                                          "mean_draft_length": sum(rows[j][2] for j in idx) / sum(rows[j][3] for j in idx)}
                                         for (name, th), rows in per_trace.items()]
                                     for w, idx in workloads.items()}
        fixed = [rows for (name, th), rows in per_trace.items() if name.startswith("fixed") and th == 0]
        result["bootstrap"][method] = {}
        for th in THRESHOLDS:
            ratios = sorted(_rate(per_trace[DEFAULT_RULE, th], idx) / max(_rate(f, idx) for f in fixed)
                            for idx in resamples)
            result["bootstrap"][method][th] = [ratios[len(ratios) // 2], ratios[int(0.025 * len(ratios))],
                                               ratios[int(0.975 * len(ratios))]]
    write_result(out, f"gamma-replay-{DEVICE}", result, markdown(result))


def _rate(rows: list[list[float]], idx: list[int]) -> float:
    """Tokens per second over the traces idx (with repeats)."""
    return sum(rows[j][0] for j in idx) / sum(rows[j][1] for j in idx)


def markdown(result: dict) -> str:
    rec = result["record"]
    costs = ", ".join(f"{name} {c['fixed_s'] * 1e3:.1f} ms + {c['per_token_s'] * 1e3:.2f} ms/token"
                      for name, c in zip(rec["models"], rec["costs"]))
    lines = ["# Draft-length policies replayed on recorded acceptance traces", "", header_markdown(result),
             f"- traces: `{rec['command']}` on {rec['machine']}, {rec['date']}: "
             f"{', '.join(f'{n} {k}' for k, n in result['traces'].items())} generations of up to "
             f"{rec['max_new_tokens']} tokens; forward costs: {costs}",
             f"- {result['seeds']} coin draws per trace; rates are modelled (forwards priced by the costs), "
             "so compare ratios",
             "- cells: modelled tokens/s relative to the best fixed setting without a confidence threshold "
             "(the sweep's best reads 1.000); columns: the confidence threshold (0: off); "
             "in brackets the proposer's mean draft length (se: the small model's)",
             "- se: the pair, small model first (fixed [small, large] gammas); sd-int4: ensemble_sd, the int4 "
             "copy of the small model drafting, both models scoring", ""]
    for method, workloads in result["methods"].items():
        for workload, rows in workloads.items():
            cells = {(r["policy"], r["threshold"]): r for r in rows}
            names = list(dict.fromkeys(r["policy"] for r in rows))
            best = max((r for r in rows if r["policy"].startswith("fixed") and r["threshold"] == 0),
                       key=lambda r: r["tokens_per_s"])
            top = max(rows, key=lambda r: r["tokens_per_s"])
            lines += [f"## {method}, {workload}", "",
                      f"best fixed setting: {best['policy']} at {best['tokens_per_s']:.2f} tok/s; best overall: "
                      f"{top['policy']}, threshold {top['threshold']} at {top['tokens_per_s'] / best['tokens_per_s']:.3f}",
                      "", "| policy | " + " | ".join(f"{th}" for th in result["thresholds"]) + " |",
                      "|---|" + "---|" * len(result["thresholds"])]
            for name in names:
                row = [cells[(name, th)] for th in result["thresholds"]]
                lines.append(f"| {name} | " + " | ".join(
                    f"{r['tokens_per_s'] / best['tokens_per_s']:.3f} ({r['mean_draft_length']:.1f})" for r in row) + " |")
            lines.append("")
        boot = result["bootstrap"][method]
        lines += [f"{method}, mixed: {DEFAULT_RULE} (the engine's `gammas=\"auto\"`) over the best fixed setting, "
                  f"median and 95% interval over {RESAMPLES} bootstrap resamples of the traces (the best fixed "
                  "setting chosen again in each): " + "; ".join(
                      f"threshold {th}: {m:.3f} ({lo:.3f}-{hi:.3f})" for th, (m, lo, hi) in boot.items()), ""]
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
