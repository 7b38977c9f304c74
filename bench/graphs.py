"""Eager vs CUDA-graph decoding on a GPU, with random-weight models of the real pair's shapes.

    python -m bench.graphs [--batches 1 8] [--prompts 4] [--max-new-tokens 128] [--logit-scale 0.5] [--max-len 2048]

No weights travel to the GPU machine, so the two models are Qwen2.5-Coder 0.5B and 1.5B Instruct
by their configs (shapes, vocabulary 151,936, bf16) with seeded random weights. Their LM heads are
scaled so that logits have standard deviation --logit-scale: two independent random models then
agree as much as a real pair does (acceptance near 0.85 at 0.5), and the measured acceptance is
reported beside every row. Prompts are random token ids (--prompt-len), T = 1, the weighted 0.5/0.5
ensemble, EOS ignored: every run decodes --max-new-tokens per prompt.

Each method runs eagerly and with CUDA graphs (``Engine(cuda_graphs=...)``) on the same prompts and
seeds, after one untimed warm-up generation (captures, Triton compiles). Per run:
  tok/s          tokens over wall time, prefill included
  ms / tick      wall time per scheduler tick
  outside fwd    share of wall time outside the models' forwards; a forward's time is the GPU time
                 between CUDA events recorded around the runner call (for an eager forward that is
                 its launch time, the GPU being starved), so the rest is sampling, verification,
                 scheduling and host syncs
  replays        forwards replayed from graphs / all forwards
Needs a CUDA GPU; writes bench/results/graphs-<gpu>.{md,json} after every row.
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from bench.env import header, header_markdown, write_result
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.model import ModelConfig, Transformer
from se_engine.runner import LoadedModel
from se_engine.sampling import SamplingParams
from se_engine.sources import tiny_tokenizer

# From the config.json transformers writes for the GGUF files (bench/results/e2e-cpu.md's models).
QWEN = dict(vocab_size=151936, num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
            tie_word_embeddings=False)
CONFIGS = {
    "qwen2.5-coder-0.5b (random)": ModelConfig(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                                               **QWEN),
    "qwen2.5-coder-1.5b (random)": ModelConfig(hidden_size=1536, intermediate_size=8960, num_layers=28,
                                               num_heads=12, **{**QWEN, "head_dim": 128}),
}
# The ensemble first: every later row's speed-up refers to it (results are written after every row).
RUNS = [("ensemble", [0, 1], None), ("single", [1], None), ("ensemble_sd", [0, 1], [6, 1]), ("se", [0, 1], [6, 1])]
WARMUP_TOKENS = 32


def random_model(name: str, cfg: ModelConfig, seed: int, logit_scale: float, max_batch: int,
                 max_len: int) -> LoadedModel:
    """Seeded weights that keep activations O(1): linear layers N(0, 1/fan_in), embeddings N(0, 1),
    unit norms, zero biases; the LM head N(0, logit_scale^2 / hidden), so logits ~ N(0, logit_scale^2)."""
    model = Transformer(cfg, max_batch=max_batch, max_len=max_len, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif pname.endswith("bias"):
                p.zero_()
            elif pname == "tok_embeddings.weight":
                p.normal_(0, 1, generator=gen)
            else:
                std = (logit_scale if pname == "output.weight" else 1.0) / p.shape[1] ** 0.5
                p.normal_(0, std, generator=gen)
    return LoadedModel(name, model, tiny_tokenizer(), sum(p.numel() for p in model.parameters()))


class ForwardTimer:
    """CUDA events around every runner forward (no sync: read after the run)."""

    def __init__(self, runners):
        self.runners, self.events = runners, []
        for r in runners:
            r.forward = self._timed(type(r).forward.__get__(r))

    def _timed(self, forward):
        def timed(*args):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward(*args)
            end.record()
            self.events.append((start, end))
            return out
        return timed

    def take_ms(self) -> float:
        torch.cuda.synchronize()
        ms = sum(s.elapsed_time(e) for s, e in self.events)
        self.events = []
        return ms

    def remove(self) -> None:
        for r in self.runners:
            del r.forward


def measure(engine: Engine, prompts: list[list[int]], batch: int, max_new_tokens: int, timer: ForwardTimer) -> dict:
    params = [SamplingParams(temperature=1.0, seed=i, max_new_tokens=max_new_tokens, ignore_eos=True)
              for i in range(len(prompts))]
    warmup = SamplingParams(temperature=1.0, seed=0, max_new_tokens=WARMUP_TOKENS, ignore_eos=True)
    engine.generate(prompts[:batch], [warmup] * batch)  # captures graphs, compiles kernels
    graphs = [r.graphs for r in engine.scheduler.runners]
    before = [dict(g.stats) if g else {} for g in graphs]
    timer.take_ms()
    ticks, forwards = engine.scheduler.stats.ticks, sum(engine.scheduler.stats.forwards)
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = []
    for i in range(0, len(prompts), batch):
        results += engine.generate(prompts[i:i + batch], params[i:i + batch])
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    forward_ms = timer.take_ms()
    ticks = engine.scheduler.stats.ticks - ticks
    replays = sum(g.stats["replay"] - b.get("replay", 0) for g, b in zip(graphs, before) if g)
    forwards = sum(engine.scheduler.stats.forwards) - forwards
    tested = sum(sum(r.metrics.drafts_tested) for r in results)
    accepted = sum(sum(r.metrics.drafts_accepted) for r in results)
    tokens = sum(r.metrics.tokens for r in results)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ticks": ticks, "ms_per_tick": 1e3 * wall / ticks,
            "outside_forward": 1 - forward_ms / (1e3 * wall), "replays": replays, "forwards": forwards,
            "acceptance": accepted / tested if tested else None, "token_ids": [r.token_ids for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per batch size at batch 1; batch B runs B of them")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--logit-scale", type=float, default=0.5)
    ap.add_argument("--max-len", type=int, default=2048,
                    help="cache capacity per sequence (the engine's default); graphs attend over all of it")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.graphs times CUDA graphs and needs a CUDA device")
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    max_batch = max(args.batches)
    max_len = args.max_len
    models = [random_model(name, cfg, seed, args.logit_scale, max_batch, max_len)
              for seed, (name, cfg) in enumerate(CONFIGS.items())]
    gen = torch.Generator().manual_seed(0)
    spec = EnsembleSpec.weighted([0.5, 0.5])
    result = {**header(), "models": list(CONFIGS), "logit_scale": args.logit_scale, "prompt_len": args.prompt_len,
              "max_new_tokens": args.max_new_tokens, "max_len": max_len, "rows": []}
    for batch in args.batches:
        count = max(args.prompts, batch) if batch == 1 else batch
        prompts = [torch.randint(0, models[0].runner.vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in range(count)]
        for method, members, gammas in RUNS:
            chosen = [models[i] for i in members]
            timer = ForwardTimer([m.runner for m in chosen])
            for graphs in (False, True):
                engine = Engine(chosen, None if method == "single" else spec, method, gammas, max_batch=batch,
                                cuda_graphs=graphs)
                row = measure(engine, prompts, batch, args.max_new_tokens, timer)
                row.update(batch=batch, method=method, gammas=gammas, graphs=graphs,
                           models=[m.name for m in chosen])
                print({k: v for k, v in row.items() if k != "token_ids"}, flush=True)
                result["rows"].append(row)
                write_result(args.out, f"graphs-{gpu}", result, markdown(result), echo=False)
            timer.remove()
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["# Eager vs CUDA graphs (random-weight models of the real pair's shapes)", "", header_markdown(result),
             f"- models: {', '.join(result['models'])}; bf16; seeded random weights, logits ~ N(0, "
             f"{result['logit_scale']}^2) (acceptance below is what these models give, not the real pair's)",
             f"- workload: random prompts of {result['prompt_len']} tokens, {result['max_new_tokens']} new tokens "
             "each, T = 1, weighted 0.5/0.5 ensemble, EOS ignored; batch 1 runs the prompts one after another; "
             f"max_len {result['max_len']} (graphed forwards attend over all of it, eager ones over the filled part)",
             "- outside fwd: share of wall time outside the models' forwards (CUDA events around each forward)",
             "- speed-up: over the ensemble with the same graphs setting and batch; graphs gain: graphs / eager", "",
             "| batch | method | gammas | graphs | tok/s | speed-up | graphs gain | ms / tick | outside fwd | "
             "acceptance | replays / forwards | same tokens as eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for r in rows:
        base = next(b for b in rows if b["batch"] == r["batch"] and b["method"] == "ensemble"
                    and b["graphs"] == r["graphs"])
        eager = next(b for b in rows if b["batch"] == r["batch"] and b["method"] == r["method"] and not b["graphs"])
        same = sum(a == b for a, b in zip(r["token_ids"], eager["token_ids"]))
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        lines.append(f"| {r['batch']} | {r['method']} | {r['gammas'] or ''} | {'yes' if r['graphs'] else 'no'} "
                     f"| {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x | {r['tok_s'] / eager['tok_s']:.2f}x "
                     f"| {r['ms_per_tick']:.2f} | {100 * r['outside_forward']:.0f}% | {acc} "
                     f"| {r['replays']} / {r['forwards']} | {same} / {len(r['token_ids'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
