"""Prefix caching through the server: a chat workload with a shared system prompt, cache on and off.

    python -m bench.serve_prefix [--requests 24] [--concurrency 2] [--rounds 2] [--max-tokens 32]
                                 [--models SMALL LARGE] [--threads 2]

Two servers side by side, the same models and settings (the real pair, se weighted 0.5 / 0.5,
bench.e2e's gammas, the default dtype), one with the prefix cache and one with --no-prefix-cache.
Request i: /v1/chat/completions, streamed, the system prompt = GSM8K's few-shot template up to its
question (about 500 tokens, the same for every request), the user message = GSM8K question i,
temperature 1, seed i, --max-tokens new tokens (ignore_eos: every request the same length). Rounds
alternate between the servers (on, off, on, off, ...), each round all
--requests requests from --concurrency clients, so that a slow phase of the machine hits both; the
idle server computes nothing meanwhile. Reports time to first token (request sent -> first content
token) p50 / p99 and latency per setting, the cached server's prefix-cache counters, and checks that
both servers answered every request identically (seeded sampling, bitwise-invariant forwards).
-> bench/results/serve-prefix-<device>.{md,json}
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from bench.datasets import DATASETS, records
from bench.e2e import ENSEMBLES, LARGE, SMALL
from bench.env import header, header_markdown, write_result
from bench.serve_load import load, metrics, percentiles, server

SETTINGS = {"on": [], "off": ["--no-prefix-cache"]}  # label -> extra server arguments
TEMPLATE = (DATASETS / "gsm8k_fewshot_prompt.txt").read_text()
SYSTEM = TEMPLATE[:TEMPLATE.index("Question: {{question}}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24, help="requests per round (GSM8K questions 0 .. N-1)")
    ap.add_argument("--concurrency", type=int, default=2, help="concurrent clients (and the servers' max_batch)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per setting, alternating")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--models", nargs=2, default=[SMALL, LARGE], metavar=("SMALL", "LARGE"),
                    help="e.g. tiny-random-llama tiny-random-qwen2 for a check of the script")
    ap.add_argument("--max-len", type=int, default=1024, help="the servers' context (the tiny models' tokenizer "
                    "takes some 2,000 tokens for the system prompt: 4096)")
    ap.add_argument("--threads", type=int, default=2, help="the servers' OMP_NUM_THREADS")
    ap.add_argument("--note", default="-")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    cfg = ENSEMBLES["weighted-t1"]
    users = [r["question"] for r in records("gsm8k_test.jsonl", args.requests)]

    def body(i: int) -> tuple[str, dict]:
        return "/v1/chat/completions", {
            "model": "bench", "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "max_tokens": args.max_tokens, "temperature": cfg.temperature, "seed": i,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": users[i]}]}

    common = ["serve", "--models", *args.models, "--method", "se", "--gammas", *map(str, cfg.gammas),
              "--weights", "0.5", "0.5", "--max-batch", str(args.concurrency), "--max-len", str(args.max_len),
              "--served-model-name", "bench", "--log-level", "warning"]
    runs: dict[str, list[list[dict]]] = {label: [] for label in SETTINGS}
    counters = {}
    with server(common + SETTINGS["on"], args.threads) as (on_url, _), \
            server(common + SETTINGS["off"], args.threads) as (off_url, _):
        urls = {"on": on_url, "off": off_url}
        for url in urls.values():  # allocations, thread pools; the cached server then holds the template
            asyncio.run(load(url, [0], 1, lambda i: body(args.requests - 1)))
        with httpx.Client(base_url=on_url, timeout=60) as client:
            before = metrics(client)
            for _, (label, url) in tqdm([*itertools.product(range(args.rounds), urls.items())], unit="round"):
                runs[label].append(asyncio.run(load(url, list(range(args.requests)), args.concurrency, body)))
            after = metrics(client)
        counters = {k: after[k] - before.get(k, 0) for k in after if k.startswith("se_engine_prefix_cache")}

    answered = {label: [r for rnd in rounds for r in rnd] for label, rounds in runs.items()}
    text = {label: {(k, r["i"]): r.get("text") for k, rnd in enumerate(rounds) for r in rnd}
            for label, rounds in runs.items()}
    checks = {
        "every request answered, 200, no error event": all(
            r["status"] == 200 and not r["errors"] and r.get("done") for rs in answered.values() for r in rs),
        "cache on and off answered identically": text["on"] == text["off"],
    }
    result = {**header(), "server": "se-engine " + " ".join(common), "threads": args.threads,
              "requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
              "max_tokens": args.max_tokens, "note": args.note, "checks": checks, "prefix_cache": counters,
              "settings": {label: {"ttft_s": percentiles([r["ttft"] for r in rs], 50, 99),
                                   "latency_s": percentiles([r["latency"] for r in rs], 50, 99),
                                   "tokens": sum(r.get("tokens", 0) for r in rs)}
                           for label, rs in answered.items()}}
    stem = f"serve-prefix-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    write_result(Path(args.out), stem, result, markdown(result))
    if not all(checks.values()):
        sys.exit("some checks failed: " + ", ".join(k for k, ok in checks.items() if not ok))


def markdown(result: dict) -> str:
    on, off = result["settings"]["on"], result["settings"]["off"]
    rows = "\n".join(
        f"| {label} | {result['rounds'] * result['requests']} | {s['ttft_s']['p50']:.3f} / {s['ttft_s']['p99']:.3f} "
        f"| {s['latency_s']['p50']:.3f} / {s['latency_s']['p99']:.3f} | {s['tokens']} |"
        for label, s in result["settings"].items())
    counters = ", ".join(f"`{k}` {v:.0f}" for k, v in result["prefix_cache"].items())
    checks = "\n".join(f"- {name}: {'yes' if ok else '**NO**'}" for name, ok in result["checks"].items())
    return f"""# Prefix caching through the server: a chat workload with a shared system prompt

{header_markdown(result)}- servers: `{result['server']}` (OMP_NUM_THREADS={result['threads']}), one with the prefix cache and one
  with `--no-prefix-cache`, side by side
- workload: streamed chat completions, system prompt = GSM8K's few-shot template up to its question
  (the same for every request), user = GSM8K question i, temperature 1, seed i, max_tokens
  {result['max_tokens']} (ignore_eos); {result['requests']} requests from {result['concurrency']} clients a round,
  {result['rounds']} rounds per setting, alternating between the servers
- TTFT: request sent -> first content token, as the client sees it
- note: {result['note']}

| prefix cache | requests | TTFT p50 / p99 s | latency p50 / p99 s | completion tokens |
|---|---|---|---|---|
{rows}

- TTFT p50 off / on: {off['ttft_s']['p50'] / on['ttft_s']['p50']:.2f}x; p99 off / on: {off['ttft_s']['p99'] / on['ttft_s']['p99']:.2f}x
- the cached server's counters over the measured rounds: {counters}

Checks:
{checks}
"""


if __name__ == "__main__":
    main()
