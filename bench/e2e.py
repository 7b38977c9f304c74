"""End-to-end benchmark: methods x ensembles x datasets on the real pair, speed and quality side by side.

    python -m bench.e2e [--ensembles weighted-t1 ...] [--datasets humaneval gsm8k mmlu] [--limit 30]
                        [--methods ensemble se ...] [--out bench/results] [--report-only]

The real pair (Qwen2.5-Coder 0.5B + 1.5B Instruct, bf16, batch 1). For each ensemble and dataset it
takes the first --limit tasks (bench.datasets) and runs every method on one task before the next, so
that a slowdown of the machine hits all methods alike; seed = task index. Tokens/s is new tokens over
the wall time of the calls (tokenization, prefill and detokenization included), summed over the tasks
that every method has finished, so every ratio compares the same prompts.

Methods:
    single-small, single-large  this engine, one model
    ensemble                    this engine, every model every token (the baseline of the speed-ups)
    ensemble_sd, se             this engine, speculative, with the ensemble's fixed gammas
    se-auto                     this engine, se with automatic draft lengths (gammas="auto")
    sd-int8, sd-int4            this engine, ensemble_sd with a weight-only int8 / int4 copy of the smaller
                                model as the drafter (``se_engine.quant``; DRAFTER_GAMMA drafts per
                                proposal), verified by both exact models: exactly the ensemble's distribution
    sd-int4-auto                sd-int4 with automatic draft lengths
    tf-large                    transformers ``generate`` of the larger model alone
    tf-assisted                 transformers assisted generation: the larger model verifies the smaller
                                one's drafts (lossless speculative decoding of the larger model alone)
    tf-assisted-ens             the same with ``assistant_ensemble_weight=0.5`` (weighted 0.5 / 0.5
                                ensembles only). It accepts drafts against 0.5 p + 0.5 q, but draws the
                                token after the drafts and the residual from the larger model alone, so
                                its output is not the ensemble's distribution (ours is)
    tf-ensemble                 the ensemble as a transformers user writes it: both models every token
                                through their own KV caches, the ensemble's r from se_engine's spec

Beside each measured speed-up stands the analytic cycle model (``se_engine.gamma.cycle_rate``) fed
with the forward costs measured at start-up and the acceptance rates measured in the run.

Each run is timed alone (bench.env.run_alone): it waits for a quiet machine and is redone if another
process took CPU time while it ran; the number of redone runs is stored with each run.

Resumable: each finished (ensemble, dataset, method, task) is stored at once in
<out>/e2e-<device>.json; a rerun with the same settings skips what is there. The Markdown report
(<out>/e2e-<device>.md) and one PNG per ensemble (<out>/e2e-<device>-<ensemble>.png, needs
matplotlib) are rewritten after every task.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench.datasets import DATASETS_BY_NAME, Task
from bench.env import header, header_markdown, run_alone
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import MAX_GAMMA, AutoGammas, ForwardCost, cycle_rate, measure_costs
from se_engine.runner import LoadedModel, Runner, load_model
from se_engine.sampling import SamplingParams
from se_engine.sources import resolve

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
DRAFTED = {"sd-int8": "int8", "sd-int4": "int4", "sd-int4-auto": "int4"}  # method -> its drafter's scheme
AUTO = ("se-auto", "sd-int4-auto")  # gammas="auto", from the forward costs in the store
OURS = ("single-small", "single-large", "ensemble", "ensemble_sd", "se", "se-auto", *DRAFTED)
PEERS = ("tf-large", "tf-assisted", "tf-assisted-ens", "tf-ensemble")
SPECULATIVE = ("ensemble_sd", "se", "se-auto", *DRAFTED)
# The drafters' draft length: near the cycle model's best at the acceptance measured in trial runs
# on 2-5 HumanEval and GSM8K prompts (int8 0.89-0.94 at 43 ms a forward, int4 0.90-0.91 at 35 ms;
# the models 81 / 186 ms over 9 tokens), where the model is flat (within 1-2% over 8-12).
DRAFTER_GAMMA = 8


@dataclass(frozen=True)
class EnsembleConfig:
    expert_first: bool  # ensemble order: (large, small) if True, else (small, large)
    spec: EnsembleSpec
    temperature: float
    gammas: tuple[int, int]  # in ensemble order


ENSEMBLES = {
    "weighted-t1": EnsembleConfig(False, EnsembleSpec.weighted([0.5, 0.5]), 1.0, (6, 1)),
    "weighted-greedy": EnsembleConfig(False, EnsembleSpec.weighted([0.5, 0.5]), 0.0, (6, 1)),
    "contrastive-greedy": EnsembleConfig(True, EnsembleSpec.contrastive(0.1), 0.0, (1, 6)),
    "contrastive-t1": EnsembleConfig(True, EnsembleSpec.contrastive(0.1), 1.0, (1, 6)),
}


def applies(method: str, ensemble: str) -> bool:
    """transformers' ensemble weight is a 0.5 / 0.5 mixture of probabilities: weighted only."""
    return method != "tf-assisted-ens" or ensemble.startswith("weighted")


@dataclass
class Generation:
    completion: str
    tokens: int
    wall_s: float
    metrics: dict | None  # this engine's Metrics.as_dict()


class Ours:
    """This engine: one Engine per (ensemble, method) over the two loaded models."""

    def __init__(self, small: LoadedModel, large: LoadedModel, costs: list[ForwardCost],
                 drafters: dict[str, tuple[Runner, ForwardCost]]):
        """costs: the small and the large model's forwards; drafters: scheme -> (runner, its forward cost)."""
        self.small, self.large, self.costs, self.drafters = small, large, costs, drafters
        self.engines: dict[tuple[str, str], Engine] = {}

    def order(self, cfg: EnsembleConfig) -> list[LoadedModel]:
        return [self.large, self.small] if cfg.expert_first else [self.small, self.large]

    def engine(self, ensemble: str, method: str) -> Engine:
        if (ensemble, method) not in self.engines:
            cfg = ENSEMBLES[ensemble]
            costs = self.costs if not cfg.expert_first else self.costs[::-1]  # in ensemble order
            if method.startswith("single"):
                engine = Engine([self.small if method == "single-small" else self.large], None, "single")
            elif method == "se-auto":
                engine = Engine(self.order(cfg), cfg.spec, "se", AutoGammas(costs))
            elif method in DRAFTED:
                drafter, cost = self.drafters[DRAFTED[method]]
                gammas = AutoGammas([*costs, cost]) if method in AUTO else [1, 1, DRAFTER_GAMMA]
                engine = Engine(self.order(cfg), cfg.spec, "ensemble_sd", gammas, drafter=drafter)
            else:
                engine = Engine(self.order(cfg), cfg.spec, method, list(cfg.gammas))
            self.engines[ensemble, method] = engine
        return self.engines[ensemble, method]

    def run(self, ensemble: str, method: str, prompt: str, seed: int, max_new_tokens: int) -> Generation:
        engine = self.engine(ensemble, method)
        # The tokenizer's EOS only, as the peers (Transformers.eos) and every stored run stop.
        params = SamplingParams(temperature=ENSEMBLES[ensemble].temperature, seed=seed, max_new_tokens=max_new_tokens,
                                ignore_eos=True, stop_token_ids=(engine.tokenizer.eos_token_id,))
        start = time.perf_counter()
        result = engine.generate(prompt, params)[0]
        wall = time.perf_counter() - start
        return Generation(result.text, len(result.token_ids), wall, result.metrics.as_dict())


class Transformers:
    """The peer: transformers' generate, assisted generation, and a hand-written ensemble loop."""

    def __init__(self, small: str, large: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.small, self.large = (AutoModelForCausalLM.from_pretrained(resolve(n, dtype), dtype=dtype).eval()
                                  for n in (small, large))
        self.tokenizer = AutoTokenizer.from_pretrained(resolve(large, dtype))
        self.eos = self.tokenizer.eos_token_id

    def config(self, temperature: float, max_new_tokens: int, **extra):
        from transformers import GenerationConfig

        if "assistant_ensemble_weight" in extra and not hasattr(GenerationConfig(), "assistant_ensemble_weight"):
            raise SystemExit("tf-assisted-ens needs a transformers with assistant_ensemble_weight (5.24 has it)")
        # Explicit top_k / top_p: transformers' defaults (top_k = 50) would cut the distribution.
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {
            "do_sample": False}
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.eos, pad_token_id=self.eos,
                                **sampling, **extra)

    def run(self, ensemble: str, method: str, prompt: str, seed: int, max_new_tokens: int) -> Generation:
        cfg = ENSEMBLES[ensemble]
        start = time.perf_counter()
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        torch.manual_seed(seed)
        with torch.inference_mode():
            if method == "tf-ensemble":
                new = self.ensemble_loop(cfg, ids, seed, max_new_tokens)
            else:
                extra = {"assistant_ensemble_weight": 0.5} if method == "tf-assisted-ens" else {}
                assistant = {} if method == "tf-large" else {"assistant_model": self.small}
                out = self.large.generate(ids, generation_config=self.config(cfg.temperature, max_new_tokens, **extra),
                                          **assistant)
                new = out[0, ids.shape[1]:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text, len(new), time.perf_counter() - start, None)

    def ensemble_loop(self, cfg: EnsembleConfig, ids: torch.Tensor, seed: int, max_new_tokens: int) -> list[int]:
        models = [self.large, self.small] if cfg.expert_first else [self.small, self.large]
        generator = torch.Generator().manual_seed(seed)
        outs = [m(ids, use_cache=True) for m in models]
        new: list[int] = []
        while len(new) < max_new_tokens and (not new or new[-1] != self.eos):
            r = cfg.spec.target([o.logits[0, -1:].float() for o in outs], cfg.temperature, 0, 1.0)[0]
            token = int(r.argmax()) if cfg.temperature == 0 else int(torch.multinomial(r, 1, generator=generator))
            new.append(token)
            step = torch.tensor([[token]])
            outs = [m(step, cache=o.cache, use_cache=True) for m, o in zip(models, outs)]
        return new


# ------------------------------------------------------------------ the report


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def _in_ensemble_order(costs: list[ForwardCost], cfg: EnsembleConfig) -> tuple[list[ForwardCost], list[int]]:
    """costs (small, large) in ensemble order, and the cycle model's order: the small model proposes first."""
    return (costs[1::-1], [1, 0]) if cfg.expert_first else (costs[:2], [0, 1])


def best_se(acceptance: list[float], costs: list[ForwardCost], cfg: EnsembleConfig) -> tuple[list[int], float]:
    """The cycle model's best se for these forward costs (small, large) and acceptance per model (ensemble
    order): the gammas in 1 .. MAX_GAMMA that maximise its speed-up over the ensemble, and that speed-up."""
    models, order = _in_ensemble_order(costs, cfg)
    rate, gammas = max((cycle_rate("se", models, [g0, g1], acceptance, order), [g0, g1])
                       for g0 in range(1, MAX_GAMMA + 1) for g1 in range(1, MAX_GAMMA + 1))
    return gammas, rate / cycle_rate("ensemble", models, order=order)


def predicted_speedup(method: str, acceptance: list[float | None], rows: list[dict], costs: list[ForwardCost],
                      cfg: EnsembleConfig) -> float | None:
    """The cycle model's speed-up over the ensemble, fed with this run's acceptance per runner (None:
    never tested) and draft lengths; costs: the small and the large model's (, the method's drafter's)."""
    if all(a is None for a in acceptance):
        return None
    acceptance = [0.0 if a is None else a for a in acceptance]
    models, order = _in_ensemble_order(costs, cfg)
    ensemble = cycle_rate("ensemble", models, order=order)
    if method in AUTO:
        lengths = [[g for r in rows for p, g in r["metrics"]["draft_lengths"] if p == m] for m in range(len(costs))]
        gammas = [sum(g) / len(g) if g else 1.0 for g in lengths]
    else:
        gammas = list(cfg.gammas) + [DRAFTER_GAMMA] * (method in DRAFTED)
    if method in DRAFTED:
        return cycle_rate("ensemble_sd", models + costs[2:], gammas, acceptance) / ensemble
    name = "se" if method == "se-auto" else method
    return cycle_rate(name, models, gammas, acceptance, order) / ensemble


def summarise(store: dict, ensemble: str, dataset: str, methods: list[str]) -> list[dict] | None:
    """One row per method over the tasks every method has finished; a method not yet run on this
    ensemble and dataset has no row (rather than emptying the table)."""
    runs = store["runs"]
    started = {key.rsplit("/", 1)[0] for key in runs}
    methods = [m for m in methods if applies(m, ensemble) and f"{ensemble}/{dataset}/{m}" in started]
    if not methods:
        return None
    done = [i for i in range(store["settings"]["limit"])
            if all(f"{ensemble}/{dataset}/{m}/{i}" in runs for m in methods)]
    if not done:
        return None
    costs = [ForwardCost(**c) for c in store["costs"]]
    drafter_costs = {scheme: ForwardCost(**c) for scheme, c in store["drafter_costs"].items()}
    cfg = ENSEMBLES[ensemble]
    base = [runs[f"{ensemble}/{dataset}/ensemble/{i}"] for i in done] if "ensemble" in methods else None
    base_rate = sum(r["tokens"] for r in base) / sum(r["wall_s"] for r in base) if base else None
    table = []
    for method in methods:
        rows = [runs[f"{ensemble}/{dataset}/{method}/{i}"] for i in done]
        rate = sum(r["tokens"] for r in rows) / sum(r["wall_s"] for r in rows)
        correct = sum(r["correct"] for r in rows)
        acceptance, depth = None, None
        runner_costs = costs + ([drafter_costs[DRAFTED[method]]] if method in DRAFTED else [])
        if method in SPECULATIVE:
            runners = range(len(rows[0]["metrics"]["drafts_tested"]))  # the models (, the drafter)
            tested, accepted = ([sum(r["metrics"][key][m] for r in rows) for m in runners]
                                for key in ("drafts_tested", "drafts_accepted"))
            acceptance = [a / t if t else None for a, t in zip(accepted, tested)]
            proposer = 2 if method in DRAFTED else 1 if cfg.expert_first else 0
            t = _sum_lists([r["metrics"]["tested_at_depth"][proposer] for r in rows])
            a = _sum_lists([r["metrics"]["accepted_at_depth"][proposer] for r in rows])
            depth = [x / y if y else None for x, y in zip(a, t)]
        table.append({
            "method": method, "tasks": len(done), "correct": correct, "ci": wilson(correct, len(done)),
            "tokens": sum(r["tokens"] for r in rows), "tok_s": rate,
            "speedup": rate / base_rate if base_rate else None,
            "predicted": (predicted_speedup(method, acceptance, rows, runner_costs, cfg)
                          if base_rate and acceptance else None),
            "acceptance": acceptance,
            "acceptance_by_depth": depth,
            "identical": (sum(r["completion"] == b["completion"] for r, b in zip(rows, base)) if base else None),
        })
    return table


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out = [0] * max((len(x) for x in lists), default=0)
    for x in lists:
        for i, v in enumerate(x):
            out[i] += v
    return out


def parity(table: list[dict], temperature: float) -> str:
    """se against ensemble: identical text when greedy; else the accuracy difference and its 95% CI."""
    by = {r["method"]: r for r in table}
    if "se" not in by or "ensemble" not in by:
        return ""
    se, ens = by["se"], by["ensemble"]
    if temperature == 0:
        return f"quality parity (greedy): se's text identical to ensemble's on {se['identical']} of {se['tasks']} tasks"
    n = se["tasks"]
    p1, p0 = se["correct"] / n, ens["correct"] / n
    half = 1.96 * math.sqrt((p1 * (1 - p1) + p0 * (1 - p0)) / n)
    inside = "includes 0: no difference detected" if abs(p1 - p0) <= half else "excludes 0"
    # The interval treats the two runs as independent samples; with the same seeds they share some
    # draws (every method draws its first token alike), which only makes it wider than needed.
    return (f"quality parity (sampling): se - ensemble = {p1 - p0:+.3f}, 95% CI +-{half:.3f} ({inside})")


def ceiling(table: list[dict], costs: list[ForwardCost], cfg: EnsembleConfig) -> str:
    """The most the cycle model allows se at this run's acceptance, beside se's measured speed-up."""
    se = next((r for r in table if r["method"] == "se"), None)
    if se is None or se["speedup"] is None or None in se["acceptance"]:
        return ""
    gammas, speedup = best_se(se["acceptance"], costs, cfg)
    return (f"se's ceiling in the cycle model at this acceptance and these forward costs: gammas {gammas} "
            f"(best of 1 .. {MAX_GAMMA} each) give {speedup:.2f}x the ensemble; measured {se['speedup']:.2f}x")


def markdown(store: dict, methods: list[str]) -> str:
    s = store["settings"]
    lines = ["# End-to-end: speed and quality per method, ensemble and dataset", ""]
    for h in store["sessions"]:
        lines += [header_markdown(h)]
    named = [*zip(s["models"], store["costs"] or []),
             *((f"{scheme} {s['models'][0]}", c) for scheme, c in store["drafter_costs"].items())]
    costs = ", ".join(f"{n}: {c['fixed_s'] * 1e3:.1f} ms + {c['per_token_s'] * 1e3:.2f} ms/token" for n, c in named)
    lines += [f"- models: {', '.join(s['models'])}; {s['dtype']}, batch 1, native runner",
              f"- tasks: the first {s['limit']} of each dataset (tables count those every method finished); "
              f"new tokens at most {s['max_new_tokens']}; seed = task index",
              f"- forward costs measured at start-up (cycle model, se-auto, sd-int4-auto): {costs}",
              f"- transformers assisted generation: {s['assisted']}",
              f"- runs redone because another process used the CPU meanwhile: "
              f"{sum(r.get('redone', 0) for r in store['runs'].values())}",
              "- tf-assisted-ens draws the token after the drafts and the residual from the larger model alone: "
              "its output is not the ensemble's distribution; this engine's methods are exact",
              f"- sd-int8 / sd-int4: ensemble_sd with {DRAFTER_GAMMA} drafts per proposal from an int8 / int4 copy of "
              f"{s['models'][0]}; both exact models score every draft, so the output is exactly the ensemble's; "
              "sd-int4-auto: the int4 drafter with automatic draft lengths (cycle model: its mean draft length)",
              f"- sessions (numbered as listed above) of each method's runs: {_sessions(store, methods)}", ""]
    for ensemble in s["ensembles"]:
        cfg = ENSEMBLES[ensemble]
        lines += [f"## {ensemble} (T = {cfg.temperature}, gammas {list(cfg.gammas)} in ensemble order)", ""]
        for dataset in s["datasets"]:
            table = summarise(store, ensemble, dataset, methods)
            if table is None:
                continue
            lines += [f"### {dataset}: {table[0]['tasks']} tasks", "",
                      "| method | quality (95% CI) | tokens | tok/s | speed-up vs ensemble | cycle model | "
                      "acceptance per model (, drafter) | same text as ensemble |", "|---|---|---|---|---|---|---|---|"]
            for r in table:
                q = f"{r['correct'] / r['tasks']:.3f} ({r['ci'][0]:.2f}-{r['ci'][1]:.2f})"
                speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
                model = "-" if r["predicted"] is None else f"{r['predicted']:.2f}x"
                acc = "-" if r["acceptance"] is None else " / ".join(
                    "-" if a is None else f"{a:.2f}" for a in r["acceptance"])
                same = "-" if r["identical"] is None else f"{r['identical']}/{r['tasks']}"
                lines.append(f"| {r['method']} | {q} | {r['tokens']} | {r['tok_s']:.2f} | {speed} | {model} | {acc} "
                             f"| {same} |")
            lines += ["", parity(table, cfg.temperature), ""]
            if bound := ceiling(table, [ForwardCost(**c) for c in store["costs"]], cfg):
                lines += [bound, ""]
    return "\n".join(lines) + "\n"


def _sessions(store: dict, methods: list[str]) -> str:
    by_method: dict[str, set[int]] = {}
    for key, run in store["runs"].items():
        by_method.setdefault(key.split("/")[2], set()).add(run["session"] + 1)
    return "; ".join(f"{m} {', '.join(map(str, sorted(by_method[m])))}" for m in methods if m in by_method)


def plot(store: dict, methods: list[str], path: Path, ensemble: str) -> None:
    """Tokens/s per method per dataset, and the small model's acceptance by draft depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {d: t for d in store["settings"]["datasets"] if (t := summarise(store, ensemble, d, methods))}
    if not tables:
        return
    fig, (bars, depth) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(tables)
    for k, (dataset, table) in enumerate(tables.items()):
        xs = [i + k * width for i in range(len(table))]
        bars.bar(xs, [r["tok_s"] for r in table], width, label=f"{dataset} ({table[0]['tasks']} tasks)")
        bars.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], [r["method"] for r in table],
                        rotation=35, ha="right")
        for r in table:
            if r["acceptance_by_depth"]:
                depth.plot(range(1, len(r["acceptance_by_depth"]) + 1), r["acceptance_by_depth"], marker="o",
                           label=f"{r['method']}, {dataset}")
    bars.set_ylabel("tokens / s (batch 1)")
    bars.set_title(f"{ensemble}: throughput")
    bars.legend()
    depth.set_xlabel("draft position in the proposal of the small model (sd-int*: its quantized copy)")
    depth.set_ylabel("acceptance rate")
    depth.set_title(f"{ensemble}: acceptance by position")
    depth.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ the run


def open_store(path: Path, settings: dict) -> dict:
    """The results so far; refuses to mix runs made with other settings."""
    if not path.exists():
        return {"settings": settings, "sessions": [], "costs": None, "drafter_costs": {}, "runs": {}}
    store = json.loads(path.read_text())
    store.setdefault("drafter_costs", {})
    fixed = ("models", "dtype", "max_new_tokens")
    if any(store["settings"][k] != settings[k] for k in fixed):
        raise SystemExit(f"{path} holds a run with other settings ({ {k: store['settings'][k] for k in fixed} }); "
                         "pass another --out or the same settings")
    for key in ("ensembles", "datasets", "methods"):
        store["settings"][key] = list(dict.fromkeys(store["settings"][key] + settings[key]))
    store["settings"]["limit"] = max(store["settings"]["limit"], settings["limit"])
    return store


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ensembles", nargs="+", choices=list(ENSEMBLES), default=list(ENSEMBLES))
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS_BY_NAME), default=list(DATASETS_BY_NAME))
    ap.add_argument("--methods", nargs="+", choices=[*OURS, *PEERS], default=[*OURS, *PEERS])
    ap.add_argument("--limit", type=int, default=30, help="tasks per dataset")
    ap.add_argument("--max-new-tokens", type=json.loads, default=None,
                    help='per dataset, as JSON, e.g. \'{"humaneval": 128}\' (default: each dataset\'s own)')
    ap.add_argument("--models", nargs=2, default=[SMALL, LARGE], metavar=("SMALL", "LARGE"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--alone", action=argparse.BooleanOptionalAction, default=True,
                    help="time each run on a quiet machine, redoing runs that shared the CPU (bench.env.run_alone)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the stored runs")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"e2e-{device}.json"
    budgets = {d: ds.max_new_tokens for d, ds in DATASETS_BY_NAME.items()} | (args.max_new_tokens or {})
    settings = {"models": args.models, "dtype": "bfloat16", "max_new_tokens": budgets, "limit": args.limit,
                "ensembles": args.ensembles, "datasets": args.datasets, "methods": args.methods,
                "assisted": "transformers defaults (assistant's num_assistant_tokens, schedule and confidence)"}
    store = open_store(path, settings)
    methods = store["settings"]["methods"]

    def report() -> None:
        (out / f"e2e-{device}.md").write_text(markdown(store, methods))
        for ensemble in store["settings"]["ensembles"]:
            plot(store, methods, out / f"e2e-{device}-{ensemble}.png", ensemble)

    todo = [(e, d, i, m) for e in args.ensembles for d in args.datasets for i in range(args.limit)
            for m in args.methods if applies(m, e) and f"{e}/{d}/{m}/{i}" not in store["runs"]]
    if args.report_only or not todo:
        report()
        return
    small, large = (load_model(n, max_len=4096) for n in args.models)
    drafters = {DRAFTED[m]: load_model(args.models[0], max_len=4096, quantize=DRAFTED[m]).runner
                for m in args.methods if m in DRAFTED}

    def measured(runners: list[Runner], max_k: int) -> list[dict]:
        measure = lambda: [asdict(c) for c in measure_costs(runners, slot=0, max_k=max_k)]  # noqa: E731
        return run_alone(measure)[0] if args.alone else measure()

    # Forward costs (cycle model, se-auto): the models' at the first run, a drafter's at its first,
    # over the query lengths the cycle model uses (a drafter feeds 1 or 2 tokens, through its kernels).
    store["costs"] = store["costs"] or measured([small.runner, large.runner], MAX_GAMMA + 1)
    for scheme, drafter in drafters.items():
        if scheme not in store["drafter_costs"]:
            store["drafter_costs"][scheme] = measured([drafter], 2)[0]
    store["sessions"].append(header())
    ours = Ours(small, large, [ForwardCost(**c) for c in store["costs"]],
                {scheme: (d, ForwardCost(**store["drafter_costs"][scheme])) for scheme, d in drafters.items()})
    peer = Transformers(*args.models, torch.bfloat16) if set(args.methods) & set(PEERS) else None
    tasks = {d: DATASETS_BY_NAME[d].load(args.limit) for d in args.datasets}
    warm = tasks[args.datasets[0]][0].prompt
    warm_up = [(ours, "se"), *((ours, m) for m in args.methods if m in DRAFTED), (peer, "tf-assisted")]
    for runner, method in warm_up:  # allocations, thread pools
        if runner:
            runner.run("weighted-t1", method, warm, 0, 8)
    for ensemble, dataset, i, method in tqdm(todo, desc="e2e", unit="run"):
        task: Task = tasks[dataset][i]
        runner = ours if method in OURS else peer
        run = lambda: runner.run(ensemble, method, task.prompt, i, budgets[dataset])  # noqa: E731
        gen, redone = run_alone(run) if args.alone else (run(), 0)
        store["runs"][f"{ensemble}/{dataset}/{method}/{i}"] = {
            **asdict(gen), "correct": DATASETS_BY_NAME[dataset].score(task, gen.completion),
            "session": len(store["sessions"]) - 1, "redone": redone}
        path.write_text(json.dumps(store))
        if method == args.methods[-1]:
            report()
    report()


if __name__ == "__main__":
    main()
