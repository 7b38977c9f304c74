"""The cost of the batch-invariant forward: the native runner's invariant kernels against torch's, side
by side in one run, on the real models (bf16, CPU), with the weight-streaming floor beside them.

    python -m bench.invariance [--models ...] [--widths 1 2 ... 17] [--batches 1 8] [--prefill 64 512 2048]

For each model and batch B in --batches: B cache slots each hold a --context-token prefix, then one
forward appends w tokens to every slot (w in --widths: decode, verify, catch-up) and is rolled back;
the median of --repeats such forwards, the two kernel sets alternating forward by forward so that
they share the machine's conditions. Prefill: one forward over a prompt of each --prefill length in
an empty slot (tokens/s and achieved TFLOP/s from 2 x params x tokens). Floor: the model's weight
bytes at the faster of two streaming rates measured in the same run: a copy of a bf16 tensor of the
model's size (read + write bytes) and the invariant GEMV over a [N, K] matrix of that size (bytes
read). Writes bench/results/invariance-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.env import alternating_ms, header, header_markdown, run_alone, write_result
from se_engine import invariant_ops, load_model
from se_engine.model import Transformer


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode forward streams: every linear layer's weight (the embedding is only gathered)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "tok_embeddings" not in name)


def streaming_ops(nbytes: int) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """A bf16 copy of nbytes of weights and the invariant GEMV over them ([nbytes / 4096, 2048]),
    and the bytes each moves (the copy reads and writes)."""
    k = 2048
    w = torch.randn(nbytes // (2 * k), k).to(torch.bfloat16)
    dst, x = torch.empty_like(w), torch.randn(1, k).to(torch.bfloat16)
    return ({"copy": lambda: dst.copy_(w), "gemv": lambda: invariant_ops.linear(x, w)},
            {"copy": 2 * w.numel() * 2, "gemv": w.numel() * 2})


def streaming_rates(nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s of a bf16 copy (read + write) and of the invariant GEMV (read), over nbytes of weights."""
    ops, moved = streaming_ops(nbytes)
    return {f"{label}_gb_s": moved[label] / median_ms(fn, repeats) / 1e6 for label, fn in ops.items()}


def forward_ms(model: Transformer, batch: int, width: int, context: int, repeats: int) -> dict[str, float]:
    """Median ms of one forward of ``width`` tokens in each of ``batch`` slots, per kernel set."""
    rows = list(range(batch))
    gen = torch.Generator().manual_seed(width)
    feeds = torch.randint(100, 10000, (batch, width), generator=gen).tolist()

    def once(invariant: bool) -> None:
        model.invariant = invariant
        model.forward(rows, feeds, [width] * batch)
        model.truncate(rows, [context] * batch)

    ms = alternating_ms({"invariant": lambda: once(True), "torch": lambda: once(False)}, repeats)
    model.invariant = True
    return ms


def prefill_ms(model: Transformer, length: int, repeats: int) -> dict[str, float]:
    tokens = [torch.randint(100, 10000, (length,), generator=torch.Generator().manual_seed(length)).tolist()]
    out = {}
    for label in ("invariant", "torch"):
        model.invariant = label == "invariant"

        def once():
            model.truncate([0], [0])
            model.forward([0], tokens, [1])

        out[label] = median_ms(once, repeats)
    model.invariant = True
    model.truncate([0], [0])
    return out


def bench_model(name: str, args) -> dict:
    max_len = max(args.prefill + [args.context + max(args.widths)]) + 1
    model = load_model(name, max_batch=max(args.batches), max_len=max_len).runner
    params = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    nbytes = weight_bytes(model)
    prefix = torch.randint(100, 10000, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {"weight_bytes": nbytes, "params": params, "streaming": run_alone(lambda: streaming_rates(nbytes, 5))[0],
           "forward_ms": {}, "prefill_ms": {}}
    for b in args.batches:
        model.truncate(list(range(model.max_batch)), [0] * model.max_batch)
        model.forward(list(range(b)), [prefix] * b, [1] * b)
        for w in args.widths:
            out["forward_ms"][f"{b}x{w}"] = run_alone(lambda: forward_ms(model, b, w, args.context, args.repeats))[0]
            print(name, f"B={b} w={w}", out["forward_ms"][f"{b}x{w}"], flush=True)
    for length in args.prefill:
        out["prefill_ms"][length] = run_alone(lambda: prefill_ms(model, length, max(1, args.repeats // 3)))[0]
        print(name, f"prefill {length}", out["prefill_ms"][length], flush=True)
    return out


def report(result: dict, args) -> str:
    lines = ["# The batch-invariant forward against torch's kernels", "", header_markdown(result),
             f"bf16, CPU; a {args.context}-token context in every slot; median of {args.repeats} forwards per "
             "cell, the two kernel sets alternating. Ratio = invariant / torch (below 1: the invariant forward "
             "is faster). Floor: the weight bytes at the faster streaming rate measured in this run.", ""]
    for name, r in result["models"].items():
        s = r["streaming"]
        rate = max(s["copy_gb_s"], s["gemv_gb_s"])
        floor = r["weight_bytes"] / rate / 1e6
        lines += [f"## {name}", "",
                  f"Weights {r['weight_bytes'] / 1e9:.2f} GB; copy {s['copy_gb_s']:.1f} GB/s (read + write), "
                  f"invariant GEMV {s['gemv_gb_s']:.1f} GB/s: floor {floor:.1f} ms per forward.", "",
                  "| batch x width | invariant ms | torch ms | ratio | invariant / floor |", "|---|---|---|---|---|"]
        for key, t in r["forward_ms"].items():
            lines.append(f"| {key} | {t['invariant']:.1f} | {t['torch']:.1f} | {t['invariant'] / t['torch']:.3f} | "
                         f"{t['invariant'] / floor:.2f} |")
        lines += ["", "| prefill tokens | invariant ms | torch ms | ratio | invariant tok/s | invariant TFLOP/s |",
                  "|---|---|---|---|---|---|"]
        for length, t in r["prefill_ms"].items():
            tflops = 2 * r["params"] * int(length) / (t["invariant"] / 1e3) / 1e12
            lines.append(f"| {length} | {t['invariant']:.0f} | {t['torch']:.0f} | {t['invariant'] / t['torch']:.2f} | "
                         f"{int(length) / t['invariant'] * 1e3:.0f} | {tflops:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
    ap.add_argument("--widths", type=int, nargs="+", default=list(range(1, 18)))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefill", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    result = {**header(), "settings": vars(args), "models": {name: bench_model(name, args) for name in args.models}}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_result(args.out, f"invariance-{device}", result, report(result, args))


if __name__ == "__main__":
    main()
