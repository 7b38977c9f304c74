"""The invariant GEMV of two builds side by side (CPU, bf16): a kernel change's speed, and the same bits.

    python -m bench.gemv_ab BASE NEW [--model qwen2.5-coder-0.5b-instruct] [--rows 1 8] [--rounds 8]

BASE and NEW are source trees with the extension built (``python setup.py build_ext --inplace``),
such as a git worktree of main and one with the change. Each round runs one process per build, in
turn, that times se_inv::linear on the model's linear-layer shapes [N, K] (random bf16 weights and
inputs of ``--rows`` rows, fixed seeds; the median of --repeats calls, under bench.env.run_alone);
the result is each shape's median over the rounds, so that the machine's drifting memory bandwidth
falls on both builds alike, NEW / BASE, and whether both builds give the same output bits.
-> bench/results/gemv-ab-<device>.{md,json}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.env import header, header_markdown, run_alone, write_result


def linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    """Each linear layer group of ``model`` -> its weight shape [N, K]."""
    from transformers import AutoConfig

    from se_engine.model import ModelConfig
    from se_engine.sources import resolve

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(resolve(model, torch.bfloat16)))
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q/k/v": (q + 2 * kv, cfg.hidden_size), "o": (cfg.hidden_size, q),
            "gate/up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size),
            "LM head": (cfg.vocab_size, cfg.hidden_size)}


def worker(tree: str, shapes: dict[str, list[int]], rows: list[int], repeats: int) -> list[dict]:
    """In a process of its own: se_engine from ``tree``, each shape's median ms and output digest."""
    sys.path.insert(0, tree)
    import se_engine
    from se_engine import invariant_ops

    from bench.invariance import median_ms

    assert Path(se_engine.__file__).resolve().is_relative_to(Path(tree).resolve()), se_engine.__file__
    out = []
    for r in rows:
        for label, (n, k) in shapes.items():
            gen = torch.Generator().manual_seed(n * k + r)
            w, x = (torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in ((n, k), (r, k)))
            y = invariant_ops.linear(x, w)
            ms, _ = run_alone(lambda: median_ms(lambda: invariant_ops.linear(x, w), repeats))
            out.append({"shape": label, "rows": r, "ms": ms,
                        "digest": hashlib.sha256(y.view(torch.int16).numpy().tobytes()).hexdigest()[:16]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("new")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON arguments of one timing process
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    shapes = linear_shapes(args.model)
    runs: dict[str, list[list[dict]]] = {"base": [], "new": []}
    for i in range(args.rounds):
        for build in runs:
            job = json.dumps({"tree": getattr(args, build), "shapes": shapes, "rows": args.rows,
                              "repeats": args.repeats})
            done = subprocess.run([sys.executable, "-m", "bench.gemv_ab", "-", "-", "--worker", job],
                                  capture_output=True, text=True, check=True)
            runs[build].append(json.loads(done.stdout.splitlines()[-1]))
        print(f"round {i + 1} of {args.rounds}", file=sys.stderr)
    rows = []
    for j, cell in enumerate(runs["base"][0]):
        base, new = (statistics.median(run[j]["ms"] for run in runs[b]) for b in ("base", "new"))
        n, k = shapes[cell["shape"]]
        same = len({run[j]["digest"] for b in runs for run in runs[b]}) == 1
        rows.append({"shape": cell["shape"], "rows": cell["rows"], "n": n, "k": k, "base_ms": base, "new_ms": new,
                     "new_over_base": new / base, "new_gb_s": n * k * 2 / new / 1e6, "same_bits": same})
    h = header()
    md = [f"# The invariant GEMV, two builds side by side: {args.model}\n", header_markdown(h),
          f"- base: `{args.base}`, new: `{args.new}`; the median over {args.rounds} rounds of one process per "
          f"build in turn, each timing the median of {args.repeats} calls per shape (random bf16 weights)\n",
          "| rows | shape | N x K | base ms | new ms | new / base | new GB/s | same bits |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['rows']} | {r['shape']} | {r['n']} x {r['k']} | {r['base_ms']:.3f} | {r['new_ms']:.3f} | "
           f"{r['new_over_base']:.2f} | {r['new_gb_s']:.1f} | {'yes' if r['same_bits'] else '**no**'} |" for r in rows]
    device = "gpu" if torch.cuda.is_available() else "cpu"
    write_result(args.out, f"gemv-ab-{device}", {**h, "model": args.model, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
