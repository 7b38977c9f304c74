"""Replicas on Ray Serve (``se_engine.serve_ray``): throughput with 1 and 2 replicas, side by side in one run.

    python -m bench.serve_ray [--replicas 1 2] [--requests 200] [--concurrency 16] [--replica-cpus 1]

For each replica count: a local Ray instance, that many replicas of the tiny ensemble (se, gammas
[3, 1], the default dtype, max_batch 8), 16 warm-up requests, then bench.serve_load's workload
(--requests requests from --concurrency clients: twins streamed and not, completions and chat, a
429 retried), then one request of each pair alone. Checks: every request answered once with a 200
and no error event, twins identical, every response equal to its solo reference. Reports
throughput, latency percentiles and how many requests each replica answered (the X-Replica header).
Writes bench/results/serve-ray-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from pathlib import Path

import ray
import torch
from ray import serve

from bench.env import header, header_markdown, write_result
from bench.serve_load import MODELS, free_port, load, percentiles
from se_engine.serve_ray import ReplicaConfig, run

ENGINE = dict(models=MODELS, method="se", gammas=[3, 1], max_batch=8, max_len=512)


def measure(replicas: int, requests: int, concurrency: int, cpus: float) -> dict:
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        start = time.perf_counter()
        run(ReplicaConfig(ENGINE, {"model_name": "bench"}, num_replicas=replicas, num_cpus=cpus),
            port=port, blocking=False)
        ready_s = time.perf_counter() - start
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, list(range(10**6, 10**6 + 16)), 16))
        start = time.perf_counter()
        records = asyncio.run(load(url, list(range(requests)), concurrency))
        wall = time.perf_counter() - start
        solo = asyncio.run(load(url, list(range(0, requests, 2)), 1))
    finally:
        serve.shutdown()
        ray.shutdown()
    ok = [r for r in records if r["status"] == 200 and not r["errors"]]
    alone = {r["i"] // 2: r["text"] for r in solo if r["status"] == 200 and not r["errors"]}
    twins = collections.defaultdict(set)
    for r in ok:
        twins[r["i"] // 2].add(r["text"])
    tokens = sum(r.get("tokens", 0) for r in ok)
    latencies = [r["latency"] for r in records]
    return {
        "replicas": replicas, "ready_s": ready_s, "wall_s": wall, "tokens": tokens,
        "requests_per_s": requests / wall, "tokens_per_s": tokens / wall,
        "latency_s": percentiles(latencies, 50, 99),
        "per_replica": sorted(collections.Counter(r.get("replica") for r in records).values(), reverse=True),
        "checks": {
            "every request answered once, 200, no error event": sorted(r["i"] for r in ok) == list(range(requests)),
            "twins identical": all(len(t) == 1 for t in twins.values()),
            "every response equal to its solo reference": len(alone) == requests // 2 and all(
                r["text"] == alone[r["i"] // 2] for r in ok),
        },
    }


def markdown(result: dict) -> str:
    base = result["runs"][0]
    rows = "\n".join(
        f"| {r['replicas']} | {r['ready_s']:.0f} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} "
        f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
        f"| {r['latency_s']['p50']:.3f} / {r['latency_s']['p99']:.3f} | {' / '.join(map(str, r['per_replica']))} "
        f"| {'yes' if all(r['checks'].values()) else '**NO**: ' + ', '.join(k for k, v in r['checks'].items() if not v)} |"
        for r in result["runs"])
    return f"""# Replicas on Ray Serve: throughput by replica count

{header_markdown(result)}- workload: bench.serve_load's ({result['requests']} requests from {result['concurrency']} clients, twins streamed and
  not, completions and chat) through Ray Serve's proxy; the tiny ensemble (se, gammas [3, 1], default dtype,
  max_batch 8) per replica, {result['replica_cpus']} Ray CPU(s) and OMP_NUM_THREADS as Ray sets it per replica
- note: {result['note']}

| replicas | ready after s | wall s | requests/s | tokens/s | vs 1 replica | latency p50 / p99 s | requests per replica | checks |
|---|---|---|---|---|---|---|---|---|
{rows}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--note", default="-")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.requests % 2:
        ap.error("--requests must be even (requests come in twins)")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    runs = [measure(n, args.requests, args.concurrency, args.replica_cpus) for n in args.replicas]
    result = {**header(), "requests": args.requests, "concurrency": args.concurrency,
              "replica_cpus": args.replica_cpus, "note": args.note, "runs": runs}
    stem = f"serve-ray-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    write_result(Path(args.out), stem, result, markdown(result))
    if not all(ok for r in runs for ok in r["checks"].values()):
        sys.exit("some checks failed")


if __name__ == "__main__":
    main()
