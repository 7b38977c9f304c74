"""CUDA graphs of the native model's forwards (se_engine.cuda_graphs).

Off CUDA the graphs' padded forward runs without capture (``capture=False``): the layout (pads at
their natural positions, attention over the whole cache, logit rows) is checked against the eager
forward everywhere; on a GPU the same tests capture and replay real graphs.
"""

import pytest
import torch

from se_engine import load_model
from se_engine.cuda_graphs import GraphedForward
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.model import Transformer
from se_engine.sampling import SamplingParams
from se_engine.sources import tiny_random_model

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ["tiny-random-qwen2", "tiny-random-llama"]
WINDOWED = "tiny-random-mistral, sliding_window=8"  # the padded forward's mask within a window


def models(graphs: bool, max_batch: int = 4, max_len: int = 64, max_width: int = 6):
    out = [load_model(n, dtype=torch.float32, device=DEVICE, max_batch=max_batch, max_len=max_len) for n in NAMES]
    for m in out:
        if graphs:
            m.runner.use_cuda_graphs(max_width, capture=CUDA)
    return out


@pytest.mark.parametrize("name", [*NAMES, "tiny-random-qwen3", "tiny-random-phi4", WINDOWED])
@pytest.mark.parametrize("max_batch", [3, 4])  # 3: the span's power of two is clamped to max_batch
def test_graphed_forwards_match_eager_ones(name, max_batch):
    """Random ragged forwards with rollbacks, a slot driven to capacity and prefills wider than
    max_width: same logits and same committed cache entries as the eager model. Every output is
    checked again at the end: a forward's logits must not change with later forwards."""
    def load():
        if name == WINDOWED:
            return Transformer.from_hf(tiny_random_model("tiny-random-mistral", sliding_window=8), max_batch=max_batch,
                                       max_len=64, dtype=torch.float32, device=DEVICE)
        return load_model(name, dtype=torch.float32, device=DEVICE, max_batch=max_batch, max_len=64).runner

    eager, graphed = load(), load()
    graphed.use_cuda_graphs(6, capture=CUDA)
    g = torch.Generator().manual_seed(max_batch)
    outputs = []
    for step in range(60):
        rows = torch.randperm(max_batch, generator=g)[:int(torch.randint(1, max_batch + 1, (1,), generator=g))].tolist()
        width = 9 if step % 15 == 0 else 6  # 9 > max_width: eager
        counts = [int(torch.randint(1, width + 1, (1,), generator=g)) for _ in rows]
        counts = [min(c, eager.max_len - eager.lengths[r]) for c, r in zip(counts, rows)]
        if min(counts) == 0:  # a full slot starts over
            full = [r for r, c in zip(rows, counts) if c == 0]
            for m in (eager, graphed):
                m.truncate(full, [0] * len(full))
            continue
        tokens = [torch.randint(0, 256, (c,), generator=g).tolist() for c in counts]
        num_logits = [int(torch.randint(0, c + 1, (1,), generator=g)) for c in counts]
        ref, got = eager.forward(rows, tokens, num_logits), graphed.forward(rows, tokens, num_logits)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        outputs.append((got, ref.clone()))
        if step % 4 == 3:  # roll a row back
            r = rows[0]
            keep = int(torch.randint(0, eager.lengths[r] + 1, (1,), generator=g))
            for m in (eager, graphed):
                m.truncate([r], [keep])
    assert eager.lengths == graphed.lengths
    for r, n in enumerate(eager.lengths):
        torch.testing.assert_close(graphed.k_cache[:, r, :, :n], eager.k_cache[:, r, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graphed.v_cache[:, r, :, :n], eager.v_cache[:, r, :, :n], atol=1e-5, rtol=1e-5)
    for got, ref in outputs:
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    stats = graphed.graphs.stats
    assert stats["replay" if CUDA else "padded"] > 20 and stats["eager"] >= 4, stats
    assert any("max_width" in why for _, why in graphed.graphs.logged)
    assert any("max_len" in why for _, why in graphed.graphs.logged), "no slot came near capacity"


def test_a_failed_capture_runs_eagerly(monkeypatch):
    eager, graphed = models(False)[0].runner, models(True)[0].runner
    monkeypatch.setattr(GraphedForward, "_build", lambda self, span, width, host: None)
    for rows, tokens in [([0], [[1, 2, 3]]), ([1, 0], [[4], [5, 6]]), ([0], [[7]])]:
        torch.testing.assert_close(graphed.forward(rows, tokens, [1] * len(rows)),
                                   eager.forward(rows, tokens, [1] * len(rows)), atol=1e-4, rtol=1e-4)
    assert graphed.graphs.stats["eager"] == 3 and not graphed.graphs.stats["replay" if CUDA else "padded"]
    assert any("capture failed" in why for _, why in graphed.graphs.logged)


@pytest.mark.parametrize("spec", [EnsembleSpec.weighted([0.5, 0.5]), EnsembleSpec.contrastive(0.3)],
                         ids=["weighted", "contrastive"])
def test_engine_with_graphs_decodes_what_the_eager_ensemble_decodes(spec):
    prompts = [[3, 9, 27, 81, 243 % 256], [5, 6], [200, 100, 50, 25]]
    greedy = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    expected = [r.token_ids for r in Engine(models(False), spec, "ensemble", cuda_graphs=False).generate(prompts, greedy)]
    graphed = models(True, max_width=10)
    for method, gammas in [("ensemble", None), ("se", [4, 2]), ("ensemble_sd", [3, 1])]:
        got = [r.token_ids for r in Engine(graphed, spec, method, gammas).generate(prompts, greedy)]
        assert got == expected, method
    sampled = [SamplingParams(temperature=0.8, seed=s, max_new_tokens=30, ignore_eos=True) for s in range(3)]
    ref = [r.token_ids for r in Engine(models(False), spec, "se", [4, 2], cuda_graphs=False).generate(prompts, sampled)]
    engine = Engine(graphed, spec, "se", [4, 2])
    got = [r.token_ids for r in engine.generate(prompts, sampled)]
    assert got == ref
    assert sorted(engine.scheduler.idle_slots()) == list(range(engine.scheduler.max_batch))  # all released
    for m in graphed:
        assert m.runner.graphs.stats["replay" if CUDA else "padded"] > 0


def test_cuda_graph_settings():
    tiny = models(False)
    Engine(tiny, EnsembleSpec.weighted([0.5, 0.5]), "se", cuda_graphs=False)
    assert all(m.runner.graphs is None for m in tiny)
    if CUDA:
        Engine(tiny, EnsembleSpec.weighted([0.5, 0.5]), "se")
        assert all(m.runner.graphs is not None for m in tiny)
    else:
        with pytest.raises(ValueError, match="cuda_graphs=True needs every model to be a native model on a CUDA"):
            Engine(tiny, EnsembleSpec.weighted([0.5, 0.5]), "se", cuda_graphs=True)
        with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
            tiny[0].runner.use_cuda_graphs(4)
    with pytest.raises(ValueError, match="max_width must be >= 1"):
        tiny[0].runner.use_cuda_graphs(0, capture=False)
