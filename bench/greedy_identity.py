"""Greedy identity on the real pair: ``se`` and ``ensemble_sd`` against ``ensemble``, token for token.

    python -m bench.greedy_identity [--limit 30] [--datasets humaneval gsm8k] [--ensembles weighted contrastive]
                                    [--max-new-tokens 128] [--max-batch 8] [--torch-kernels]

For each ensemble (weighted 0.5 / 0.5 over the 0.5B and the 1.5B, se / ensemble_sd gammas [6, 1];
contrastive 0.1 with the 1.5B as the expert, gammas [1, 6]) and dataset (the first --limit tasks of
bench.datasets), every method decodes all the prompts greedily (temperature 0, up to --max-new-tokens,
the engine's stop tokens), --max-batch sequences at a time, in the default dtype (bf16). A task is
identical when a method's tokens equal the ensemble's; else the report gives the first position
where they part. --torch-kernels loads the models with batch_invariant=False (torch's kernels) for
comparison. Writes bench/results/greedy-identity-<device>[-torch-kernels].{md,json} after every
(ensemble, dataset), keeping the rows of earlier runs for other (ensemble, dataset) pairs, so runs
with other settings add to one report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.datasets import DATASETS_BY_NAME
from bench.env import header, header_markdown, write_result
from se_engine import load_model
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.sampling import SamplingParams

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
# name -> (spec, model order, gammas of se / ensemble_sd)
ENSEMBLES = {
    "weighted": (EnsembleSpec.weighted([0.5, 0.5]), (SMALL, LARGE), [6, 1]),
    "contrastive": (EnsembleSpec.contrastive(0.1), (LARGE, SMALL), [1, 6]),
}
METHODS = ("ensemble", "se", "ensemble_sd")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where a and b differ (their common length if one is a prefix), None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--datasets", nargs="+", choices=["humaneval", "gsm8k", "mmlu"], default=["humaneval", "gsm8k"])
    ap.add_argument("--ensembles", nargs="+", choices=list(ENSEMBLES), default=list(ENSEMBLES))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--torch-kernels", action="store_true", help="batch_invariant=False: torch's kernels")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    loaded = {name: load_model(name, max_batch=args.max_batch, max_len=args.max_len,
                               batch_invariant=not args.torch_kernels) for name in (SMALL, LARGE)}
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = f"greedy-identity-{device}" + ("-torch-kernels" if args.torch_kernels else "")
    stored = Path(args.out) / f"{stem}.json"
    for ensemble in args.ensembles:
        spec, order, gammas = ENSEMBLES[ensemble]
        models = [loaded[name] for name in order]
        for dataset in args.datasets:
            prompts = [task.prompt for task in DATASETS_BY_NAME[dataset].load(args.limit)]
            tokens, seconds = {}, {}
            for method in METHODS:
                engine = Engine(models, spec, method, None if method == "ensemble" else gammas)
                start = time.perf_counter()
                tokens[method] = [r.token_ids for r in engine.generate(prompts, params, progress=True)]
                seconds[method] = time.perf_counter() - start
            run = header()  # the machine and time of these rows
            # read now, not at start: another run may have written rows meanwhile
            rows = json.loads(stored.read_text())["rows"] if stored.exists() else []
            rows = [r for r in rows if (r["ensemble"], r["dataset"]) != (ensemble, dataset)]
            for method in METHODS[1:]:
                parted = [first_difference(got, want) for got, want in zip(tokens[method], tokens["ensemble"])]
                rows.append({"ensemble": ensemble, "dataset": dataset, "method": method, "tasks": len(prompts),
                             "max_batch": args.max_batch,
                             "identical": sum(p is None for p in parted), "first_difference": parted,
                             "tokens": sum(map(len, tokens["ensemble"])), "seconds": seconds[method],
                             "ensemble_seconds": seconds["ensemble"], "machine": run["machine"], "date": run["date"]})
                print(rows[-1]["ensemble"], dataset, method, f"{rows[-1]['identical']}/{len(prompts)} identical",
                      flush=True)
            write(args, stem, rows)


def write(args, stem: str, rows: list[dict]) -> None:
    result = {**header(), "settings": vars(args), "rows": rows}
    kernels = "torch's kernels (batch_invariant=False)" if args.torch_kernels else "the batch-invariant kernels"
    lines = ["# Greedy identity on the real pair", "", header_markdown(result),
             f"bf16 on the CPU, {kernels}; greedy, up to {args.max_new_tokens} new tokens (the engine's stop "
             "tokens); weighted 0.5 / 0.5 (0.5B, 1.5B), gammas [6, 1]; contrastive 0.1 (1.5B expert, 0.5B "
             "amateur), gammas [1, 6]. The header is the last run's; rows of earlier runs (other datasets or "
             "ensembles) are kept, each with its task count, batch size, machine and date.", "",
             "| ensemble | dataset | method | tasks (batch) | identical to `ensemble` | first differing position "
             "(parted tasks) | machine, date |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        parted = ", ".join(str(p) for p in r["first_difference"] if p is not None) or "-"
        lines.append(f"| {r['ensemble']} | {r['dataset']} | `{r['method']}` | {r['tasks']} ({r['max_batch']}) | "
                     f"{r['identical']} / {r['tasks']} | {parted} | {r['machine']}, {r['date']} |")
    write_result(args.out, stem, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
