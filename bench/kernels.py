"""Verify-step microbenchmark: the fused Triton kernels vs the PyTorch reference vs a per-row loop.

    python -m bench.kernels [--batches 1 8 64] [--ks 1 4 8] [--models 2 3] [--vocab 151936]

For every (B, k, n): B sequences with k drafts each, n models' bf16 logits [B * k, V], a weighted
ensemble with equal weights at T = 1, drafts drawn from their proposer. Three implementations of
the same step, each timed end to end as the engine calls it (median of triton.testing.do_bench):
  fused    se_engine.verify.verify_triton (the kernels of triton_kernels.verify: three launches, no
           host sync)
  torch    verify_reference (vectorised PyTorch; the CPU engine's path)
  per-row  a Python loop over sequences and positions, one softmax / mixture / acceptance /
           multinomial per row, like the sampler of the vLLM-0.6.5 reference implementation
Bandwidth: the fused step's logits bytes (read once) / its time, against a device-to-device copy of
the same number of bytes measured in the same run. Needs a CUDA GPU; writes
bench/results/kernels-<gpu>.{md,json}.
"""

from __future__ import annotations

import argparse
import re

import torch
import triton.testing

from bench.env import header, header_markdown, write_result
from se_engine.ensemble import EnsembleSpec
from se_engine.sampling import STREAM_DRAFT, SamplingParams, sample
from se_engine.verify import verify_reference, verify_triton


def make_step(B: int, k: int, n: int, V: int, device: str) -> tuple:
    g = torch.Generator(device=device).manual_seed(B * 100 + k * 10 + n)
    T = B * k
    base = torch.randn(T, V, device=device, generator=g) * 3
    logits = [(base + torch.randn(T, V, device=device, generator=g)).to(torch.bfloat16) for _ in range(n)]
    proposer = torch.zeros(T, dtype=torch.long, device=device)
    positions = torch.arange(T, device=device) % k + 100
    seeds = torch.arange(B, device=device)
    drafts = sample(logits[0].float().softmax(-1), seeds.repeat_interleave(k), positions, STREAM_DRAFT)
    offsets = torch.arange(B + 1, device=device) * k
    return logits, drafts, proposer, positions, offsets, [SamplingParams()] * B, seeds


def verify_per_row(logits, spec, drafts, proposer, positions, offsets, params, seeds, *_):
    """One row at a time, as the reference implementation's sampler does."""
    out = []
    for b in range(len(params)):
        emitted = []
        for row in range(int(offsets[b]), int(offsets[b + 1])):
            probs = [x[row].float().softmax(-1) for x in logits]
            r = sum(w * p for w, p in zip(spec.coefficients, probs))
            q = probs[int(proposer[row])]
            x = int(drafts[row])
            if torch.rand(()).item() * q[x].item() <= r[x].item():
                emitted.append(x)
                continue
            emitted.append(int(torch.multinomial((r - q).clamp_min(0), 1)))
            break
        out.append(emitted)
    return out


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--models", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels times GPU kernels and needs a CUDA device; on the CPU the verify step's "
                         "share of a real SE step is reported by `python -m bench.speedup`.")
    device = "cuda"
    result = {**header(), "vocab": args.vocab, "rows": []}
    for n in args.models:
        spec = EnsembleSpec.weighted([1.0] * n)
        for B in args.batches:
            for k in args.ks:
                step = make_step(B, k, n, args.vocab, device)
                logits = step[0]
                nbytes = sum(x.numel() * x.element_size() for x in logits)
                src = torch.empty(nbytes, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                copy_ms = bench(lambda: dst.copy_(src))
                ms = {"fused": bench(lambda: verify_triton(step[0], spec, *step[1:], max_n=k)),
                      "torch": bench(lambda: verify_reference(step[0], spec, *step[1:], max_n=k)),
                      "per-row": bench(lambda: verify_per_row(step[0], spec, *step[1:]))}
                row = {"n": n, "B": B, "k": k, "ms": ms, "logits_bytes": nbytes,
                       "copy_GBps": 2 * nbytes / copy_ms / 1e6, "fused_GBps": nbytes / ms["fused"] / 1e6}
                result["rows"].append(row)
                print(row, flush=True)
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    lines = ["# Verify step: fused Triton kernels vs PyTorch", "", header_markdown(result),
             f"- V = {args.vocab}, bf16 logits, weighted ensemble (equal weights), T = 1, k drafts per sequence",
             "- times: median ms of triton.testing.do_bench, each implementation called as the engine calls it",
             "- bandwidth: fused = logits bytes / fused time; copy = (read + write) bytes / time of a "
             "device-to-device copy of the same size", "",
             "| n | B | k | fused ms | torch ms | per-row ms | torch / fused | per-row / fused | fused GB/s | "
             "copy GB/s | fused / copy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['n']} | {r['B']} | {r['k']} | {ms['fused']:.3f} | {ms['torch']:.3f} | {ms['per-row']:.3f} "
                     f"| {ms['torch'] / ms['fused']:.1f}x | {ms['per-row'] / ms['fused']:.1f}x | {r['fused_GBps']:.0f} "
                     f"| {r['copy_GBps']:.0f} | {100 * r['fused_GBps'] / r['copy_GBps']:.0f}% |")
    write_result(args.out, f"kernels-{gpu}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
