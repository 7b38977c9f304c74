"""Native runner vs transformers: single-model decode tokens/s and one forward over k query tokens,
against the weight-streaming floor.

    python -m bench.runner [--models qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct]

Decode: greedy, batch 1, a 64-token prompt, --new-tokens tokens; transformers runs ``generate``
(static shapes, no sampling), the native runner a plain argmax loop. Forward over k: the cache holds
the prompt, then k tokens are appended and rolled back (native: truncate; transformers: crop). Beside
each runner's forward, in turn round by round (bench.env.alternating_ms), run the native runner's
linear layers alone on k rows and the two streaming ops of bench.invariance (a bf16 copy and the
invariant GEMV over the model's weight bytes); the floor is those bytes at the faster op's rate in
that run. Medians of --repeats rounds. Writes bench/results/runner-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from bench.env import alternating_ms, header, header_markdown, run_alone, write_result
from bench.invariance import streaming_ops, weight_bytes
from se_engine import resolve
from se_engine.model import Transformer, project


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_model(name: str, new_tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    hf = AutoModelForCausalLM.from_pretrained(resolve(name, dtype), dtype=dtype).eval()
    native = Transformer.from_hf(hf, max_batch=1, max_len=512, dtype=dtype)
    prompt = torch.randint(100, 10000, (1, 64), generator=torch.Generator().manual_seed(0))
    ids = prompt[0].tolist()

    def native_prefill() -> torch.Tensor:
        native.truncate([0], [0])
        return native.forward([0], [ids], [1])

    def native_decode():
        logits = native_prefill()
        for _ in range(new_tokens):
            logits = native.forward([0], [[int(logits[-1].argmax())]], [1])

    def hf_decode():
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)

    prefill = {"native": statistics.median(timed(native_prefill) for _ in range(repeats))}
    with torch.inference_mode():
        prefill["transformers"] = statistics.median(timed(lambda: hf(prompt, logits_to_keep=1)) for _ in range(repeats))
    decode = {}
    for label, fn in (("native", native_decode), ("transformers", hf_decode)):
        fn()  # warm-up
        total = run_alone(lambda: statistics.median(timed(fn) for _ in range(max(1, repeats // 2))))[0]
        decode[label] = new_tokens / (total - prefill[label])

    streams, moved = streaming_ops(weight_bytes(native))
    linears = [m for m in native.modules() if type(m) is nn.Linear]
    native_prefill()
    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        hf(prompt, past_key_values=cache, use_cache=True)
    forward_k = {}
    for k in range(1, 9):
        draft = torch.randint(100, 10000, (1, k))
        rows = {n: torch.randn(k, n).to(dtype) for n in {m.in_features for m in linears}}

        def native_k():
            native.forward([0], draft.tolist(), [k])
            native.truncate([0], [64])

        def hf_k():
            with torch.inference_mode():
                hf(draft, past_key_values=cache, use_cache=True)
            cache.crop(-k)

        @torch.inference_mode()
        def linears_k():
            for m in linears:
                project(m, rows[m.in_features], native.invariant)

        runs = {"native": native_k, "transformers": hf_k, "linear layers": linears_k, **streams}
        forward_k[k] = run_alone(lambda: alternating_ms(runs, repeats))[0]
    return {"decode_tok_s": decode, "forward_ms": forward_k, "weight_bytes": weight_bytes(native),
            "stream_bytes": moved}


def floor_ms(r: dict, k: int) -> float:
    """The model's weight bytes at the faster streaming rate of the k-token forward's run."""
    ms = r["forward_ms"][k]
    return r["weight_bytes"] / max(r["stream_bytes"][op] / ms[op] for op in r["stream_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dtype = torch.bfloat16
    result = {**header(), "dtype": "bfloat16", "models": {}}
    for name in args.models:
        print(f"benchmarking {name} ...", flush=True)
        result["models"][name] = bench_model(name, args.new_tokens, args.repeats, dtype)

    lines = ["# Native runner vs transformers", "", header_markdown(result),
             f"bf16, batch 1, 64-token prompt, {args.new_tokens} greedy tokens; median of {args.repeats} runs.", "",
             "## Decode tokens/s (prefill excluded)", "", "| model | native | transformers generate | ratio |",
             "|---|---|---|---|"]
    for name, r in result["models"].items():
        d = r["decode_tok_s"]
        lines.append(f"| {name} | {d['native']:.1f} | {d['transformers']:.1f} | {d['native'] / d['transformers']:.2f}x |")
    lines += ["", "## One forward over k query tokens on a 64-token cache (ms)", "",
              "Floor: the weight bytes at the faster of a copy's and the invariant GEMV's rate, measured "
              "beside each k; native / floor below.", "",
              "| model | | " + " | ".join(f"k={k}" for k in range(1, 9)) + " |", "|---|---|" + "---|" * 8]
    for name, r in result["models"].items():
        for label in ("native", "transformers", "linear layers"):
            lines.append(f"| {name} | {label} | " + " | ".join(f"{r['forward_ms'][k][label]:.1f}" for k in range(1, 9))
                         + " |")
        lines.append(f"| {name} | floor | " + " | ".join(f"{floor_ms(r, k):.1f}" for k in range(1, 9)) + " |")
        lines.append(f"| {name} | native / floor | " + " | ".join(
            f"{r['forward_ms'][k]['native'] / floor_ms(r, k):.2f}" for k in range(1, 9)) + " |")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_result(args.out, f"runner-{device}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
