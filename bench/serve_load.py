"""A bounded load test of ``se-engine serve`` on loopback: correctness under concurrency, latency, memory.

    python -m bench.serve_load [--requests 200] [--concurrency 16] [--max-batch 8] [--threads 1]

Starts the server as a subprocess (the tiny random models, se with gammas [3, 1], the server's
default dtype unless --dtype) and sends --requests requests from --concurrency concurrent clients (raw
HTTP, as the openai client sends it). Requests come in twins: requests 2k and 2k+1 have the same
prompt, seed (k), temperature (0: greedy for every third pair, else 0.8) and max_tokens (8 .. 64), one
streamed and one not; twins alternate between /v1/completions and /v1/chat/completions. After the
load, one request of each pair is sent again alone (one client, one request at a time): its solo
reference. Checks: every request answered once with status 200 and no error event, all response ids
distinct, twins identical (no output crosses between requests, streaming equals non-streaming), every
response equal to its solo reference (what a request emits does not depend on what else the batch
held), completion tokens within max_tokens, the server's own counters (finished, aborted, generated
tokens) matching what the clients received, and the server's RSS back near its post-warm-up baseline
afterwards. Writes bench/results/serve-load-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.env import header, header_markdown, write_result

MODELS = ["tiny-random-llama", "tiny-random-qwen2"]
RSS_SLACK = 1.10  # "back to about its baseline": within 10% (allocators keep some freed memory)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


def request_body(i: int) -> tuple[str, dict]:
    """Request i: the twin pair k = i // 2 shares everything but streaming."""
    k = i // 2
    body = {"model": "bench", "max_tokens": 8 + (k * 7) % 57, "temperature": 0.0 if k % 3 == 0 else 0.8, "seed": k,
            "stream": i % 2 == 1}
    text = f"Request {k}: tell me about the number {k * 37 % 101}."
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    if k % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


async def send(client: httpx.AsyncClient, i: int) -> dict:
    path, body = request_body(i)
    chat = "chat" in path
    start = time.perf_counter()
    rec = {"i": i, "stream": body["stream"], "max_tokens": body["max_tokens"], "errors": []}
    if not body["stream"]:
        r = await client.post(path, json=body)
        rec["status"], out = r.status_code, r.json()
        if r.status_code == 200:
            choice = out["choices"][0]
            rec.update(id=out["id"], text=choice["message"]["content"] if chat else choice["text"],
                       finish=choice["finish_reason"], tokens=out["usage"]["completion_tokens"])
        else:
            rec["errors"].append(out)
    else:
        text, rec["ids"] = [], set()
        async with client.stream("POST", path, json=body) as r:
            rec["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec["done"] = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    rec["errors"].append(event)
                    continue
                rec["ids"].add(event["id"])
                if event.get("usage"):
                    rec["tokens"] = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    delta = choice["delta"].get("content") if chat else choice["text"]
                    if delta and "ttft" not in rec:
                        rec["ttft"] = time.perf_counter() - start
                    text.append(delta or "")
                    rec["finish"] = choice["finish_reason"] or rec.get("finish")
        rec.update(text="".join(text), id=rec["ids"].pop() if len(rec["ids"]) == 1 else None)
        del rec["ids"]
    rec["latency"] = time.perf_counter() - start
    return rec


async def load(url: str, indices: list[int], concurrency: int) -> list[dict]:
    """``concurrency`` clients, each sending its next request as soon as its last one is answered."""
    pending = iter(indices)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> list[dict]:
            return [await send(client, i) for i in pending]  # the shared iterator hands each index out once
        return [rec for recs in await asyncio.gather(*[worker() for _ in range(concurrency)]) for rec in recs]


def check(records: list[dict], solo: list[dict], sent: int, before: dict, after: dict) -> dict[str, bool]:
    ok = [r for r in records if r["status"] == 200 and not r["errors"] and r.get("id")]
    alone = {r["i"] // 2: r["text"] for r in solo if r["status"] == 200 and not r["errors"]}
    by_index = sorted(r["i"] for r in records)
    twins = {}
    for r in ok:
        twins.setdefault(r["i"] // 2, []).append(r["text"])
    tokens = sum(r.get("tokens", 0) for r in ok)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    finished, generated = (sum(v for k, v in delta.items() if k.startswith(f"se_engine_{name}"))
                           for name in ("requests_finished_total", "generation_tokens_total"))
    return {
        "every request answered exactly once": by_index == list(range(sent)),
        "no error responses": len(ok) == sent,
        "response ids distinct": len({r["id"] for r in ok}) == sent,
        "streams ended with [DONE]": all(r.get("done") for r in ok if r["stream"]),
        "twins identical (streamed = not streamed)": all(len(set(t)) == 1 for t in twins.values()),
        "every response equal to its solo reference": len(alone) == sent // 2 and all(
            r["text"] == alone[r["i"] // 2] for r in ok),
        "completion tokens within max_tokens": all(
            r["tokens"] <= r["max_tokens"] and (r["finish"] != "length" or r["tokens"] == r["max_tokens"])
            for r in ok),
        "server counted each request once": finished == sent and delta["se_engine_requests_aborted_total"] == 0,
        "server's generated tokens = clients' usage": generated == tokens,
    }


def markdown(result: dict) -> str:
    lat, rss = result["latency_s"], result["rss_mb"]
    rss_row = " / ".join(f"{rss[k]:.0f}" for k in ("start", "baseline", "peak", "after"))
    acceptance = ", ".join(f"{m} {r:.2f}" for m, r in result["acceptance_rate"].items())
    checks = "\n".join(f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in result["checks"].items())
    return f"""# Serving under load: `se-engine serve` on loopback

{header_markdown(result)}- server: `{result['server']}` (OMP_NUM_THREADS={result['threads']})
- workload: {result['requests']} requests from {result['concurrency']} concurrent clients (raw HTTP), closed loop;
  twins 2k / 2k+1 share prompt, seed k, temperature (0 for every third pair, else 0.8) and max_tokens (8 .. 64),
  one streamed and one not; twins alternate between /v1/completions and /v1/chat/completions;
  {result['warmup']} warm-up requests first; afterwards one request of each pair alone (its solo reference)
- note: {result['note']}

| check | passed |
|---|---|
{checks}

| measure | value |
|---|---|
| wall time | {result['wall_s']:.1f} s |
| throughput | {result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.1f} generated tokens/s |
| generated tokens | {result['tokens']} |
| latency p50 / p90 / p99 / max | {lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} / {lat['max']:.3f} s |
| time to first token, streams, p50 / p99 | {result['ttft_s']['p50']:.3f} / {result['ttft_s']['p99']:.3f} s |
| server acceptance rate per model | {acceptance} |
| server RSS: after start / after warm-up (baseline) / peak / after the load | {rss_row} MB |
"""


def percentiles(xs: list[float], *qs: int) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(xs, q)) for q in qs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS (tiny models: 1 is fastest)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="the server's --dtype (default: its own, bf16)")
    ap.add_argument("--note", default="-", help="conditions worth recording (e.g. a shared CPU)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.requests % 2:
        ap.error("--requests must be even (requests come in twins)")

    port = free_port()
    server_args = ["serve", "--models", *MODELS, "--gammas", "3", "1", "--max-len", "512",
                   "--max-batch", str(args.max_batch), "--port", str(port), "--served-model-name", "bench",
                   "--log-level", "warning", *(["--dtype", args.dtype] if args.dtype else [])]
    proc = subprocess.Popen([sys.executable, "-m", "se_engine.cli", *server_args],
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        client = httpx.Client(base_url=url, timeout=60)
        while True:
            if proc.poll() is not None:
                sys.exit("the server exited")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        rss = {"start": rss_mb(proc.pid)}
        warmup = args.concurrency
        asyncio.run(load(url, list(range(args.requests, args.requests + warmup)), args.concurrency))
        rss["baseline"] = rss_mb(proc.pid)
        before = metrics(client)

        peak = [rss["baseline"]]
        stop = asyncio.Event()

        async def run() -> list[dict]:
            async def sample() -> None:
                while not stop.is_set():
                    peak.append(rss_mb(proc.pid))
                    await asyncio.sleep(0.2)
            sampler = asyncio.create_task(sample())
            try:
                return await load(url, list(range(args.requests)), args.concurrency)
            finally:
                stop.set()
                await sampler

        start = time.perf_counter()
        records = asyncio.run(run())
        wall = time.perf_counter() - start
        time.sleep(2)  # let the server finish its bookkeeping
        after = metrics(client)
        rss.update(peak=max(peak), after=rss_mb(proc.pid))
        solo = asyncio.run(load(url, list(range(0, args.requests, 2)), 1))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    checks = check(records, solo, args.requests, before, after)
    checks["server RSS back to about its baseline"] = rss["after"] <= rss["baseline"] * RSS_SLACK
    latencies = [r["latency"] for r in records]
    ttfts = [r["ttft"] for r in records if "ttft" in r]
    tokens = sum(r.get("tokens", 0) for r in records)
    result = {
        **header(), "server": "se-engine " + shlex.join(server_args), "threads": args.threads,
        "requests": args.requests, "concurrency": args.concurrency, "warmup": warmup, "note": args.note,
        "checks": checks, "wall_s": wall, "tokens": tokens,
        "requests_per_s": args.requests / wall, "tokens_per_s": tokens / wall,
        "latency_s": {**percentiles(latencies, 50, 90, 99), "max": max(latencies)},
        "ttft_s": percentiles(ttfts, 50, 99),
        "acceptance_rate": {m: after.get(f'se_engine_acceptance_rate{{model="{m}"}}') for m in MODELS},
        "rss_mb": rss,
    }
    stem = f"serve-load-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    write_result(Path(args.out), stem, result, markdown(result))
    if not all(checks.values()):
        sys.exit("some checks failed: " + ", ".join(k for k, ok in checks.items() if not ok))


if __name__ == "__main__":
    main()
