"""A bounded load test of ``se-engine serve`` on loopback: correctness under concurrency, latency, memory.

    python -m bench.serve_load [--rounds 200x16 500x64 200x16 500x64] [--flood 200x16] [--max-batch 8]
                               [--threads 1]

Starts the server as a subprocess (the tiny random models, se with gammas [3, 1], the server's
default dtype and limits unless --dtype) and runs rounds: a round NxC sends N requests from C
concurrent clients (raw HTTP, as the openai client sends it; a 429 is retried after its
Retry-After, as the openai client does). Requests come in twins: requests 2k and 2k+1 have the same
prompt, seed (k), temperature (0: greedy for every third pair, else 0.8) and max_tokens (8 .. 64), one
streamed and one not; twins alternate between /v1/completions and /v1/chat/completions. After the
load, one request of each pair is sent again alone (one client, one request at a time): its solo
reference. Checks: every request answered once with status 200 and no error event, all response ids
distinct, twins identical (no output crosses between requests, streaming equals non-streaming), every
response equal to its solo reference (what a request emits does not depend on what else the batch
held), completion tokens within max_tokens, the server's own counters (finished, aborted, generated
tokens) matching what the clients received, and the server's RSS back near its post-warm-up baseline
after every round (the rounds repeat the same requests). Then two probes: /health polled while a
prompt of the largest body the server takes is tokenized (its slowest answer), and a flood: the
--flood round again while FLOODERS clients send requests of the most sequences a request may ask for
(FLOOD_PROMPTS prompts x n = 16), back to back, which fill the queue: they get 429s, and the round's
latency is compared with the same round run quietly before it. Writes
bench/results/serve-load-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.env import header, header_markdown, write_result

MODELS = ["tiny-random-llama", "tiny-random-qwen2"]
RSS_SLACK = 1.10  # "back to about its baseline": within 10% (allocators keep some freed memory)
HEALTH_LIMIT_S = 0.1  # /health answers within this while a maximum-size prompt is tokenized
MAX_BODY_BYTES = 4 * 2**20  # the server's default limit (se_engine.server.MAX_BODY_BYTES)
FLOODERS, FLOOD_PROMPTS = 4, 16  # 16 prompts x n = 16: the server's default max_request_sequences, 256


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


Body = Callable[[int], tuple[str, dict]]  # request index -> (path, JSON body)


async def send(client: httpx.AsyncClient, i: int, body: Body = request_body) -> dict:
    """Request i, retried after Retry-After while the server answers 429."""
    start = time.perf_counter()
    retries = 0
    while (rec := await send_once(client, i, start, body))["status"] == 429:
        retries += 1
        await asyncio.sleep(float(rec["retry_after"]))
    rec.update(retries=retries, latency=time.perf_counter() - start)
    return rec


async def send_once(client: httpx.AsyncClient, i: int, start: float, body_of: Body) -> dict:
    path, body = body_of(i)
    chat = "chat" in path
    rec = {"i": i, "stream": body["stream"], "max_tokens": body["max_tokens"], "errors": []}
    if not body["stream"]:
        r = await client.post(path, json=body)
        rec["status"], rec["retry_after"], out = r.status_code, r.headers.get("retry-after"), r.json()
        rec["replica"] = r.headers.get("x-replica")  # behind Ray Serve (se_engine.serve_ray)
        if r.status_code == 200:
            choice = out["choices"][0]
            rec.update(id=out["id"], text=choice["message"]["content"] if chat else choice["text"],
                       finish=choice["finish_reason"], tokens=out["usage"]["completion_tokens"])
        else:
            rec["errors"].append(out)
    else:
        text, rec["ids"] = [], set()
        async with client.stream("POST", path, json=body) as r:
            rec["status"], rec["retry_after"], rec["replica"] = (r.status_code, r.headers.get("retry-after"),
                                                                 r.headers.get("x-replica"))
            if r.status_code != 200:
                if r.status_code != 429:
                    rec["errors"].append(json.loads(await r.aread()))
                return rec
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
    return rec


async def load(url: str, indices: list[int], concurrency: int, body: Body = request_body) -> list[dict]:
    """``concurrency`` clients, each sending its next request as soon as its last one is answered."""
    pending = iter(indices)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> list[dict]:
            return [await send(client, i, body) for i in pending]  # the shared iterator hands each index out once
        return [rec for recs in await asyncio.gather(*[worker() for _ in range(concurrency)]) for rec in recs]


def check(records: list[dict], solo: list[dict], sent: int, before: dict, after: dict, others: tuple[int, int] = (0, 0)
          ) -> dict[str, bool]:
    """The checks of a round; others: (sequences, generated tokens) the server served beside it (a flood)."""
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
        "server counted each request once": finished == sent + others[0]
        and delta["se_engine_requests_aborted_total"] == 0,
        "server's generated tokens = clients' usage": generated == tokens + others[1],
    }


async def flood_client(url: str, stop: asyncio.Event) -> list[tuple[int, int]]:
    """One flooding client: requests of FLOOD_PROMPTS prompts x n = 16, back to back (a 429 is not
    waited out) until ``stop``; their (status, completion tokens)."""
    body = {"model": "bench", "prompt": [f"flood {j}" for j in range(FLOOD_PROMPTS)], "n": 16, "max_tokens": 4,
            "temperature": 0.8}
    statuses = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        while not stop.is_set():
            r = await client.post("/v1/completions", json=body)
            statuses.append((r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0))
            await asyncio.sleep(0.05)
    return statuses


def run_round(url: str, client: httpx.Client, pid: int, spec: str, baseline_mb: float, flooders: int = 0) -> dict:
    """One round NxC (see the module docstring), with ``flooders`` flooding clients beside it."""
    n, concurrency = (int(x) for x in spec.split("x"))
    before = metrics(client)
    peak = [rss_mb(pid)]
    flood: list[tuple[int, int]] = []  # (status, completion tokens)

    async def run() -> list[dict]:
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                peak.append(rss_mb(pid))
                await asyncio.sleep(0.2)
        side = [asyncio.create_task(sample()), *(asyncio.create_task(flood_client(url, stop)) for _ in range(flooders))]
        try:
            return await load(url, list(range(n)), concurrency)
        finally:
            stop.set()
            for task in side[1:]:
                flood.extend(await task)
            await side[0]

    start = time.perf_counter()
    records = asyncio.run(run())
    wall = time.perf_counter() - start
    time.sleep(2)  # let the server finish its bookkeeping
    after, after_mb = metrics(client), rss_mb(pid)
    solo = asyncio.run(load(url, list(range(0, n, 2)), 1))
    served = [tokens for status, tokens in flood if status == 200]
    checks = check(records, solo, n, before, after, (len(served) * FLOOD_PROMPTS * 16, sum(served)))
    statuses = [status for status, _ in flood]
    checks["server RSS back to about its baseline"] = after_mb <= baseline_mb * RSS_SLACK
    if flooders:
        checks["the flood got 429s"] = 429 in statuses
    latencies = [r["latency"] for r in records]
    tokens = sum(r.get("tokens", 0) for r in records)
    return {
        "round": spec, "flooders": flooders, "checks": checks, "wall_s": wall, "tokens": tokens,
        "requests_per_s": n / wall, "tokens_per_s": tokens / wall,
        "latency_s": {**percentiles(latencies, 50, 90, 99), "max": max(latencies)},
        "ttft_s": percentiles([r["ttft"] for r in records if "ttft" in r], 50, 99),
        "retried_429": sum(r["retries"] for r in records),
        "flood": {str(st): statuses.count(st) for st in sorted(set(statuses))},
        "rss_peak_mb": max(peak), "rss_after_mb": after_mb,
        "acceptance_rate": {m: after.get(f'se_engine_acceptance_rate{{model="{m}"}}') for m in MODELS},
    }


def health_while_tokenizing(url: str, pid: int) -> dict:
    """/health's answer times while a prompt of the largest body the server takes is tokenized, and the
    server's RSS afterwards."""
    # Encoded here: json.dumps holds this process's GIL, which would stall the polls' own clock.
    body = json.dumps({"model": "bench", "prompt": "word " * ((MAX_BODY_BYTES - 100) // 5)}).encode()
    waits, answer = [], {}

    def post() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            answer["status"] = c.post("/v1/completions", content=body,
                                      headers={"content-type": "application/json"}).status_code

    thread = threading.Thread(target=post)
    with httpx.Client(base_url=url, timeout=60) as c:
        thread.start()
        while thread.is_alive():
            start = time.perf_counter()
            assert c.get("/health").status_code == 200
            waits.append(time.perf_counter() - start)
            time.sleep(0.02)
    thread.join()
    time.sleep(2)  # the server hands freed memory back after answering
    return {"polls": len(waits), "max_s": max(waits), "p50_s": float(np.median(waits)), "status": answer["status"],
            "rss_after_mb": rss_mb(pid)}


def markdown(result: dict) -> str:
    rows = []
    for r in result["rounds"]:
        lat, ttft = r["latency_s"], r["ttft_s"]
        flood = ", ".join(f"{k}: {v}" for k, v in r["flood"].items()) or "-"
        failed = [name for name, ok in r["checks"].items() if not ok]
        rows.append(f"| {r['round']} | {r['flooders'] or '-'} | {'all ' + str(len(r['checks'])) if not failed else '**NO**: ' + ', '.join(failed)} "
                    f"| {r['wall_s']:.1f} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} "
                    f"| {lat['p50']:.3f} / {lat['p99']:.3f} / {lat['max']:.3f} | {ttft['p50']:.3f} / {ttft['p99']:.3f} "
                    f"| {r['retried_429']} | {flood} | {r['rss_peak_mb']:.0f} / {r['rss_after_mb']:.0f} |")
    rss, health = result["rss_mb"], result["health"]
    quiet, flooded = result["rounds"][-2], result["rounds"][-1]
    checks = "\n".join(f"- {name}" for name in result["rounds"][0]["checks"])
    return f"""# Serving under load: `se-engine serve` on loopback

{header_markdown(result)}- server: `{result['server']}` (OMP_NUM_THREADS={result['threads']})
- workload: rounds NxC: N requests from C concurrent clients (raw HTTP, closed loop, a 429 retried after
  its Retry-After); twins 2k / 2k+1 share prompt, seed k, temperature (0 for every third pair, else 0.8)
  and max_tokens (8 .. 64), one streamed and one not, alternating between /v1/completions and
  /v1/chat/completions; {result['warmup']} warm-up requests first; after each round one request of each
  pair alone (its solo reference). The last round runs beside {FLOODERS} flooding clients sending requests
  of {FLOOD_PROMPTS} prompts x n = 16 (256 sequences each) back to back.
- note: {result['note']}

Checks of every round:
{checks}

| round | flooders | checks passed | wall s | requests/s | tokens/s | latency p50 / p99 / max s | TTFT p50 / p99 s | 429s retried | flood statuses | RSS peak / after MB |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- server RSS after start / after warm-up (the baseline of the RSS checks): {rss['start']:.0f} / {rss['baseline']:.0f} MB
- /health while a prompt of {MAX_BODY_BYTES // 2**20} MiB (the server's largest body) was tokenized: slowest answer
  {health['max_s'] * 1000:.0f} ms, median {health['p50_s'] * 1000:.0f} ms over {health['polls']} polls
  (limit {HEALTH_LIMIT_S * 1000:.0f} ms: {'yes' if health['max_s'] < HEALTH_LIMIT_S else '**NO**'}); the prompt itself: {health['status']};
  server RSS afterwards {health['rss_after_mb']:.0f} MB
- under the flood, the round's latency p99 is {flooded['latency_s']['p99'] / quiet['latency_s']['p99']:.2f}x and p50
  {flooded['latency_s']['p50'] / quiet['latency_s']['p50']:.2f}x the same round's run quietly just before
"""


def percentiles(xs: list[float], *qs: int) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(xs, q)) for q in qs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(server_args: list[str], threads: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """``se-engine serve`` on a free loopback port, with OMP_NUM_THREADS=threads, until /health answers;
    yields its URL and process, and ends it with SIGINT."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "se_engine.cli", *server_args, "--port", str(port)],
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                if proc.poll() is not None:
                    sys.exit("the server exited")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", nargs="+", default=["200x16", "500x64", "200x16", "500x64"], metavar="NxC")
    ap.add_argument("--flood", default="200x16", metavar="NxC", help="the round run quietly, then under the flood")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS (tiny models: 1 is fastest)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="the server's --dtype (default: its own, bf16)")
    ap.add_argument("--note", default="-", help="conditions worth recording (e.g. a shared CPU)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    for spec in [*args.rounds, args.flood]:
        n, _, c = spec.partition("x")
        if not (n.isdigit() and c.isdigit() and int(n) % 2 == 0 and int(n) > 0 and int(c) > 0):
            ap.error(f"a round is NxC with N even (requests come in twins) and C >= 1, got {spec!r}")

    server_args = ["serve", "--models", *MODELS, "--gammas", "3", "1", "--max-len", "512",
                   "--max-batch", str(args.max_batch), "--served-model-name", "bench",
                   "--log-level", "warning", *(["--dtype", args.dtype] if args.dtype else [])]
    with server(server_args, args.threads) as (url, proc), httpx.Client(base_url=url, timeout=60) as client:
        rss = {"start": rss_mb(proc.pid)}
        warmup = 16
        asyncio.run(load(url, list(range(10**6, 10**6 + warmup)), warmup))
        rss["baseline"] = rss_mb(proc.pid)
        rounds = [run_round(url, client, proc.pid, spec, rss["baseline"]) for spec in [*args.rounds, args.flood]]
        health = health_while_tokenizing(url, proc.pid)
        rounds.append(run_round(url, client, proc.pid, args.flood, rss["baseline"], flooders=FLOODERS))

    result = {
        **header(), "server": "se-engine " + shlex.join(server_args), "threads": args.threads, "warmup": warmup,
        "note": args.note, "rounds": rounds, "health": health, "rss_mb": rss,
    }
    stem = f"serve-load-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    write_result(Path(args.out), stem, result, markdown(result))
    failed = [f"{r['round']}: {name}" for r in rounds for name, ok in r["checks"].items() if not ok]
    if health["rss_after_mb"] > rss["baseline"] * RSS_SLACK:
        failed.append(f"RSS {health['rss_after_mb']:.0f} MB after the largest prompt")
    if health["max_s"] >= HEALTH_LIMIT_S:
        failed.append(f"/health took {health['max_s']:.3f} s while a prompt was tokenized")
    if failed:
        sys.exit("some checks failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
