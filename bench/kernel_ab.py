"""The batch-invariant CPU kernels of two builds side by side (bf16): a kernel change's speed, same bits.

    python -m bench.kernel_ab BASE NEW [--model qwen2.5-coder-0.5b-instruct] [--rows 1 8] [--rounds 8]
                              [--quantize int4]

BASE and NEW are source trees with the extension built (``python setup.py build_ext --inplace``),
such as a git worktree of main and one with the change. Each round runs one process per build, in
turn (which goes first alternates), that times the se_inv ops on one decode layer of the model:
``linear`` on each linear layer's weight shape [N, K], ``rms_norm`` of the hidden state, ``rope``
of q and k, and ``attention`` over a --context-token cache, for ``--rows`` tokens (random bf16 inputs, fixed seeds; the median of
--repeats calls, under bench.env.run_alone); then the model's whole forward (real weights, the
native runner), where the ops run among each other as in decoding: one slot given ``rows`` tokens
and, for rows > 1, ``rows`` slots given one token each, every slot on a --context-token prefix, with
its logits' bits as the digest. The result is each op's median over the rounds, so that
the machine's drifting memory bandwidth falls on both builds alike, NEW / BASE, and whether both
builds give the same output bits. --quantize: the model's quantized copy (``se_engine.quant``, a
drafter's) instead: its linear layers in place of ``linear``, and its whole forward; drafters need not
be bitwise the same across builds. -> bench/results/kernel-ab-cpu.{md,json}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import zlib
from functools import partial
from pathlib import Path

import torch

from bench.env import header, header_markdown, run_alone, write_result


def layer_cases(model: str) -> dict[str, list]:
    """Each op of one decode layer of ``model`` -> [op, its sizes]: linear [N, K], rms_norm [D],
    rope [H, D] (q, then k), attention [Hq, Hkv, D]."""
    from transformers import AutoConfig

    from se_engine.model import ModelConfig
    from se_engine.sources import resolve

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(resolve(model, torch.bfloat16)))
    hidden, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return {"q/k/v": ["linear", q + 2 * kv, hidden], "o": ["linear", hidden, q],
            "gate/up": ["linear", 2 * cfg.intermediate_size, hidden], "down": ["linear", hidden, cfg.intermediate_size],
            "LM head": ["linear", cfg.vocab_size, hidden], "rms_norm": ["rms_norm", hidden],
            "rope q": ["rope", cfg.num_heads, d], "rope k": ["rope", cfg.num_kv_heads, d],
            "attention": ["attention", cfg.num_heads, cfg.num_kv_heads, d]}


def worker(tree: str, model: str, cases: dict[str, list], rows: list[int], context: int, repeats: int,
           quantize: str | None) -> list[dict]:
    """In a process of its own: se_engine from ``tree``, each case's median ms and output digest."""
    sys.path.insert(0, tree)
    import se_engine
    from se_engine import invariant_ops, quant

    from bench.invariance import median_ms

    assert Path(se_engine.__file__).resolve().is_relative_to(Path(tree).resolve()), se_engine.__file__
    out = []
    for r in rows:
        for label, (op, *sizes) in cases.items():
            gen = torch.Generator().manual_seed(zlib.crc32(f"{label} {r}".encode()))

            def rand(*shape: int) -> torch.Tensor:
                return torch.randn(shape, generator=gen).to(torch.bfloat16)

            if op == "linear":
                x, w = rand(r, sizes[1]), rand(*sizes)
                if quantize:
                    layer = torch.nn.Linear(sizes[1], sizes[0], bias=False, dtype=torch.bfloat16)
                    layer.weight.data = w
                    call = partial(quant.LAYERS[quantize](layer), x)
                else:
                    call = partial(invariant_ops.linear, x, w)
            elif op == "rms_norm":
                x, w = rand(r, sizes[0]), rand(sizes[0])
                call = partial(invariant_ops.rms_norm, x, w, 1e-6, False)
            elif op == "rope":
                x, angles = rand(r, *sizes), torch.rand(r, 1, sizes[1] // 2, generator=gen) * 100
                cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
                call = partial(invariant_ops.rope, x, cos, sin)
            else:  # attention: one slot, the rows' keys written after a context-token prefix
                hq, hkv, d = sizes
                q, k_cache, v_cache = rand(r, hq, d), rand(1, hkv, context + r, d), rand(1, hkv, context + r, d)
                slots, positions = torch.zeros(r, dtype=torch.long), torch.arange(context, context + r)
                call = partial(invariant_ops.attention, q, k_cache, v_cache, slots, positions)
            y = call()
            ms, _ = run_alone(lambda: median_ms(call, repeats))
            out.append({"case": label, "op": op, "sizes": sizes, "rows": r, "ms": ms, "digest": digest(y)})
    runner = se_engine.load_model(model, max_batch=max(rows), max_len=context + max(rows), quantize=quantize).runner
    gen = torch.Generator().manual_seed(0)
    for slot in range(max(rows)):
        runner.forward([slot], [torch.randint(0, runner.vocab_size, (context,), generator=gen).tolist()], [1])
    for r in rows:
        for slots, width in sorted({(1, r), (r, 1)}):
            feed = torch.randint(0, runner.vocab_size, (slots, width), generator=gen).tolist()

            def once() -> torch.Tensor:
                logits = runner.forward(list(range(slots)), feed, [width] * slots)
                runner.truncate(list(range(slots)), [context] * slots)
                return logits

            y = once()
            ms, _ = run_alone(lambda: median_ms(once, repeats))
            out.append({"case": "forward", "op": "forward", "sizes": [slots, width], "rows": r, "ms": ms,
                        "digest": digest(y)})
    return out


def digest(y: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of y's bits."""
    return hashlib.sha256(y.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("new")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quantize", choices=["int8", "int4"], help="time the model's quantized copy (a drafter)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON arguments of one timing process
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    cases = layer_cases(args.model)
    runs: dict[str, list[list[dict]]] = {"base": [], "new": []}
    for i in range(args.rounds):
        for build in ("base", "new") if i % 2 == 0 else ("new", "base"):  # neither build always runs first
            job = json.dumps({"tree": getattr(args, build), "model": args.model, "cases": cases, "rows": args.rows,
                              "context": args.context, "repeats": args.repeats, "quantize": args.quantize})
            done = subprocess.run([sys.executable, "-m", "bench.kernel_ab", "-", "-", "--worker", job],
                                  capture_output=True, text=True, check=True)
            runs[build].append(json.loads(done.stdout.splitlines()[-1]))
        print(f"round {i + 1} of {args.rounds}", file=sys.stderr)
    rows = []
    for j, cell in enumerate(runs["base"][0]):
        base, new = (statistics.median(run[j]["ms"] for run in runs[b]) for b in ("base", "new"))
        same = len({run[j]["digest"] for b in runs for run in runs[b]}) == 1
        rows.append({**{k: cell[k] for k in ("case", "op", "sizes", "rows")}, "base_ms": base, "new_ms": new,
                     "new_over_base": new / base, "same_bits": same})
    h = header()
    subject = f"{args.quantize} copy of {args.model}" if args.quantize else args.model
    md = [f"# The invariant CPU kernels, two builds side by side: one decode layer of {subject}\n",
          header_markdown(h),
          f"- base: `{args.base}`, new: `{args.new}`; the median over {args.rounds} rounds of one process per "
          f"build in turn, each timing the median of {args.repeats} calls per op (random bf16 inputs; "
          f"attention over a {args.context}-token cache; linear sizes N x K; forward sizes slots x tokens "
          f"each, logits of every token)\n",
          "| rows | op | sizes | base ms | new ms | new / base | same bits |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['rows']} | {r['case']} | {' x '.join(map(str, r['sizes']))} | {r['base_ms']:.4f} | "
           f"{r['new_ms']:.4f} | {r['new_over_base']:.2f} | {'yes' if r['same_bits'] else '**no**'} |" for r in rows]
    write_result(args.out, "kernel-ab-cpu", {**h, "model": args.model, "quantize": args.quantize,
                                             "context": args.context, "rows": rows},
                 "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
