"""Where a decode forward's time goes: per op against the weight-streaming floor (CPU, bf16).

    python -m bench.forward_profile [--models ...] [--shapes 1x1 1x8 8x1] [--context 256] [--repeats 10]

For each real model (the native runner, the batch-invariant kernels) and each shape BxW (B slots,
each holding a --context-token prefix, get W tokens and their W logits, then roll back): the median
wall time of --repeats forwards, each run beside a bf16 copy and an invariant GEMV of the model's
weight bytes (bench.invariance.streaming_ops), since this machine's memory bandwidth drifts from
minute to minute; the floor is the weight bytes at the faster of the two rates. Then one
torch.profiler pass over --repeats more forwards: its ops' own (self) CPU time per forward grouped
as each linear layer by its weight shape (q/k/v, o, gate/up, down, LM head), attention, every other
op, and the rest of that pass's time (Python, dispatch, allocation between ops); the profiler adds
a few microseconds per op. -> bench/results/forward-profile-<device>.{md,json}
"""

from __future__ import annotations

import argparse
import collections
import re
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench.env import alternating_ms, header, header_markdown, run_alone, write_result
from bench.invariance import streaming_ops, weight_bytes
from se_engine import load_model
from se_engine.model import Transformer

LINEAR_NAMES = {"attention.wqkv": "q/k/v", "attention.wo": "o", "feed_forward.w13": "gate/up",
                "feed_forward.w2": "down", "output": "LM head"}


def linear_groups(model: Transformer) -> dict[tuple[int, int], tuple[str, int]]:
    """Weight shape [N, K] -> (the linear layers of that shape, their weight bytes over all layers)."""
    groups: dict[tuple[int, int], tuple[str, int]] = {}
    for name, p in model.named_parameters():
        if p.dim() != 2 or "tok_embeddings" in name:
            continue
        label = LINEAR_NAMES[re.sub(r"^layers\.\d+\.", "", name).removesuffix(".weight")]
        known, nbytes = groups.get(tuple(p.shape), (label, 0))
        groups[tuple(p.shape)] = (known if label in known.split(" + ") else f"{known} + {label}",
                                  nbytes + p.numel() * p.element_size())
    return groups


def breakdown(model: Transformer, streams: dict[str, Callable[[], object]], batch: int, width: int, context: int,
              repeats: int) -> dict:
    """One shape: the median wall ms of a forward and of each streaming op, alternating with it run
    by run (the machine's memory bandwidth drifts), and the per-group op ms of one profiled pass."""
    rows = list(range(batch))
    feeds = torch.randint(0, model.vocab_size, (batch, width), generator=torch.Generator().manual_seed(width)).tolist()

    def once() -> None:
        model.forward(rows, feeds, [width] * batch)
        model.truncate(rows, [context] * batch)

    medians = alternating_ms({"forward": once, **streams}, repeats)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            once()
        profiled = (time.perf_counter() - start) / repeats * 1e3
    shapes = linear_groups(model)
    ms: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key == "se_inv::linear":
            group = shapes[tuple(event.input_shapes[1])][0]
        elif event.key == "se_inv::attention":
            group = "attention"
        else:
            group = "other ops"
        ms[group] += event.self_cpu_time_total / 1e3 / repeats
    ms["Python, dispatch, allocation"] = profiled - sum(ms.values())
    return {"wall_ms": medians.pop("forward"), "stream_ms": medians, "profiled_ms": profiled, "group_ms": dict(ms)}


def bench_model(name: str, args) -> dict:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    model = load_model(name, max_batch=max(b for b, _ in shapes), max_len=args.context + 64).runner
    streams, moved = streaming_ops(weight_bytes(model))
    out = {"weight_bytes": weight_bytes(model), "stream_bytes": moved,
           "linear_bytes": {label: nbytes for label, nbytes in linear_groups(model).values()}, "shapes": {}}
    prefix = torch.randint(0, model.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    for b, w in shapes:
        model.truncate(list(range(model.max_batch)), [0] * model.max_batch)
        model.forward(list(range(b)), [prefix] * b, [1] * b)
        out["shapes"][f"{b}x{w}"] = run_alone(lambda: breakdown(model, streams, b, w, args.context, args.repeats))[0]
        print(name, f"{b}x{w}", f"{out['shapes'][f'{b}x{w}']['wall_ms']:.1f} ms", flush=True)
    return out


def markdown(result: dict) -> str:
    lines = ["# Where a decode forward's time goes", "", header_markdown(result),
             f"- bf16, the native runner's batch-invariant kernels; BxW: B slots each holding a "
             f"{result['context']}-token prefix get W tokens and W logits; the median of {result['repeats']} "
             "forwards, each beside a bf16 copy and an invariant GEMV of the model's weight bytes (the "
             "floor: those bytes at the faster of the two rates, which drift with the machine); op self "
             "times from one torch.profiler pass over as many more forwards (the profiler adds a few us per "
             "op), the rest of that pass's time per forward being Python, dispatch and allocation",
             "- cells: ms per forward (x its floor: the group's weight bytes at the same rate)", ""]
    for name, r in result["models"].items():
        keys = list(r["shapes"])
        rates = {k: max(r["stream_bytes"][op] / ms / 1e6 for op, ms in r["shapes"][k]["stream_ms"].items())
                 for k in keys}  # GB/s
        lines += [f"## {name}", "", f"Weights {r['weight_bytes'] / 1e9:.2f} GB.", "",
                  "| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
                  "| streaming rate (GB/s) | " + " | ".join(f"{rates[k]:.1f}" for k in keys) + " |",
                  "| floor | " + " | ".join(f"{r['weight_bytes'] / rates[k] / 1e6:.1f}" for k in keys) + " |",
                  "| **whole forward** | " + " | ".join(
                      f"**{r['shapes'][k]['wall_ms']:.1f}** "
                      f"({r['shapes'][k]['wall_ms'] * rates[k] * 1e6 / r['weight_bytes']:.2f})"
                      for k in keys) + " |",
                  "| profiled pass | " + " | ".join(f"{r['shapes'][k]['profiled_ms']:.1f}" for k in keys) + " |"]
        for group in [*r["linear_bytes"], "attention", "other ops", "Python, dispatch, allocation"]:
            cells = []
            for k in keys:
                t = r["shapes"][k]["group_ms"].get(group, 0.0)
                nbytes = r["linear_bytes"].get(group)
                cells.append(f"{t:.1f} ({t * rates[k] * 1e6 / nbytes:.2f})" if nbytes else f"{t:.1f}")
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
    ap.add_argument("--shapes", nargs="+", default=["1x1", "1x8", "8x1"], metavar="BxW")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    result = {**header(), "context": args.context, "repeats": args.repeats,
              "models": {name: bench_model(name, args) for name in args.models}}
    stem = f"forward-profile-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    write_result(args.out, stem, result, markdown(result))


if __name__ == "__main__":
    main()
