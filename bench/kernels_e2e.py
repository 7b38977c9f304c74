"""The batch-invariant kernels end to end: `ensemble` and `se` on the real pair with the invariant
kernels and with torch's, side by side in one run.

    python -m bench.kernels_e2e [--limit 10] [--datasets humaneval gsm8k] [--max-new-tokens 128]

The real pair (bench.e2e's models, bf16, batch 1), ensemble weighted-t1 (0.5 / 0.5, T = 1, e2e's
gammas), the first --limit tasks of each dataset, seed = task index, the prefix cache off (as in
bench.e2e's committed rows). Two copies of the models: one with the batch-invariant kernels (the
default), one loaded with batch_invariant=False (torch's kernels). Each task runs every (kernels,
method) before the next, each run timed alone (bench.env.run_alone), so that a slow phase of the
machine hits all four. Tokens/s: new tokens over the wall time of the calls (prefill included),
summed over the tasks; the speed-up is se's over ensemble's with the same kernels.
-> bench/results/kernels-e2e-<device>.{md,json}
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from bench.datasets import DATASETS_BY_NAME
from bench.e2e import ENSEMBLES, LARGE, SMALL
from bench.env import header, header_markdown, run_alone, write_result
from bench.prefix_cache import timed
from se_engine.engine import Engine
from se_engine.runner import load_model
from se_engine.sampling import SamplingParams

ENSEMBLE = "weighted-t1"
KERNELS = {"invariant": True, "torch": False}  # label -> load_model(batch_invariant=...)
METHODS = ("ensemble", "se")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=10, help="tasks per dataset")
    ap.add_argument("--datasets", nargs="+", choices=["humaneval", "gsm8k"], default=["humaneval", "gsm8k"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--models", nargs=2, default=[SMALL, LARGE], metavar=("SMALL", "LARGE"),
                    help="e.g. tiny-random-llama tiny-random-qwen2 for a check of the script")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    cfg = ENSEMBLES[ENSEMBLE]
    copies = {label: [load_model(n, max_len=4096, batch_invariant=on) for n in args.models]
              for label, on in KERNELS.items()}
    engines = {(k, m): Engine(copies[k], cfg.spec, m, list(cfg.gammas), prefix_cache=False)
               for k in KERNELS for m in METHODS}
    result = {**header(), "models": args.models, "ensemble": ENSEMBLE, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens,
              "runs": {f"{d}/{k}/{m}": [] for d in args.datasets for k, m in engines}}
    stem = f"kernels-e2e-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    warm = DATASETS_BY_NAME[args.datasets[0]].load(1)[0].prompt
    for engine in engines.values():  # allocations, thread pools
        engine.generate(warm, SamplingParams(max_new_tokens=8, seed=0))
    for dataset in args.datasets:
        for i, task in enumerate(tqdm(DATASETS_BY_NAME[dataset].load(args.limit), desc=dataset, unit="task")):
            params = SamplingParams(temperature=cfg.temperature, seed=i, max_new_tokens=args.max_new_tokens)
            for (kernels, method), engine in engines.items():
                row, redone = run_alone(lambda: timed(engine, task.prompt, params))  # noqa: B023
                result["runs"][f"{dataset}/{kernels}/{method}"].append(
                    {"tokens": row["tokens"], "wall_s": row["wall_s"], "redone": redone})
            write_result(args.out, stem, result, markdown(result), echo=False)
    print(markdown(result))


def markdown(result: dict) -> str:
    runs = result["runs"]
    rate = {key: sum(r["tokens"] for r in rows) / sum(r["wall_s"] for r in rows) for key, rows in runs.items() if rows}
    lines = ["# The batch-invariant kernels end to end: invariant and torch's side by side", "",
             header_markdown(result),
             f"- models: {', '.join(result['models'])}; bf16, batch 1, native runner, prefix cache off; "
             f"ensemble {result['ensemble']}",
             f"- workload: the first {result['limit']} tasks of each dataset, up to {result['max_new_tokens']} new "
             "tokens, seed = task index; each task through all four (kernels, method) before the next",
             f"- runs redone because another process used the CPU meanwhile: "
             f"{sum(r['redone'] for rows in runs.values() for r in rows)}", "",
             "| dataset | kernels | tasks | ensemble tok/s | se tok/s | se / ensemble | invariant / torch (same method) |",
             "|---|---|---|---|---|---|---|"]
    for key in runs:
        dataset, kernels, method = key.split("/")
        if method != "ensemble" or key not in rate or f"{dataset}/{kernels}/se" not in rate:
            continue
        ens, se = rate[key], rate[f"{dataset}/{kernels}/se"]
        vs = "-"
        if kernels == "invariant" and f"{dataset}/torch/se" in rate:
            vs = (f"ensemble {ens / rate[f'{dataset}/torch/ensemble']:.2f}x, "
                  f"se {se / rate[f'{dataset}/torch/se']:.2f}x")
        lines.append(f"| {dataset} | {kernels} | {len(runs[key])} | {ens:.2f} | {se:.2f} | {se / ens:.2f}x | {vs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
