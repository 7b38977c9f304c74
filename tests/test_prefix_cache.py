"""Prefix caching across requests (se_engine.prefix_cache): the same tokens with and without it, in
every method, batched; the reuse it claims; eviction under pressure; a stale entry caught.

The workload: prompts over one shared template (suffixes of a few tokens, one prompt repeated, one
the template itself), in two rounds: the second round's prompts are first-round prompts followed by
their outputs (a conversation's next turn), so that reused entries include ones computed by decode
steps, not only by prefills. Two slots for eight prompts: requests take cached slots over, and
evict, while others run.
"""

import json
import random

import pytest
import torch
from test_batching import NAMES

from bench import prefix_cache
from se_engine import load_model
from se_engine.engine import GRAPH_MAX_WIDTH, Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.nested import NestedDrafter
from se_engine.prefix_cache import PrefixCache
from se_engine.sampling import SamplingParams

SLOTS = 2
GREEDY = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True)
SPECS = {1: EnsembleSpec.weighted([1.0]), 2: EnsembleSpec.weighted([0.6, 0.4]),
         3: EnsembleSpec.weighted([0.2, 0.3, 0.5])}


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(NAMES, max_batch=SLOTS, max_len=160)


def first_round(seed: int) -> list[list[int]]:
    """Eight prompts over one 24-token template."""
    rng = random.Random(seed)
    template = [rng.randrange(256) for _ in range(24)]
    suffixes = [[rng.randrange(256) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    other = [rng.randrange(256) for _ in range(10)]  # shares nothing with the template
    return [template + suffixes[0], template + suffixes[1], other, template + suffixes[0], template,
            template[:12] + suffixes[2], template + suffixes[3], template + suffixes[4]]


def two_rounds(models, spec, method, params, prefix_cache: bool, gammas=None, drafter=None) -> list:
    """Both rounds through one engine: the results of both."""
    engine = Engine(models, spec, method, gammas, max_batch=SLOTS, prefix_cache=prefix_cache, drafter=drafter)
    prompts = first_round(len(models))
    first = engine.generate(prompts, params)
    # The last to finish first: their slots are still cached, outputs and all.
    turns = [p + r.token_ids + [3] for p, r in zip(prompts, first)][:3:-1]
    return first + engine.generate(turns, params)


def assert_same_tokens(models, spec, method, params, gammas=None, make_drafter=None) -> list:
    """The workload with and without the cache emits the same tokens; returns the cached run's results.
    make_drafter: a new drafter for each engine (its own cache)."""
    off, on = (two_rounds(models, spec, method, params, cached, gammas, make_drafter() if make_drafter else None)
               for cached in (False, True))
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    return on


CASES = [("single", 1), ("ensemble", 2), ("ensemble", 3), ("ensemble_sd", 2), ("ensemble_sd", 3), ("se", 2),
         ("se", 3)]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("method,n", CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_same_tokens_with_and_without_the_cache(tiny, method, n, params):
    results = assert_same_tokens(tiny[:n], SPECS[n], method, params)
    reused = [r for r in results if r.metrics.prefix_tokens[0]]
    assert len(reused) >= 6, [r.metrics.prefix_tokens for r in results]
    assert max(r.metrics.prefix_tokens[0] for r in results) > 40  # a turn reused its previous output's entries
    if method in ("ensemble_sd", "se"):  # rollbacks in sequences that started from a cached prefix
        assert any(r.metrics.drafts_accepted < r.metrics.drafts_tested for r in reused)


def test_same_tokens_with_graphed_forwards():
    """The CUDA graphs' padded forward (here uncaptured, on the CPU) writes pads into every slot of
    its span past that slot's length, cached slots too: past the entries a cached slot keeps."""
    models = [load_model(name, max_batch=SLOTS, max_len=160) for name in NAMES[:2]]
    for m in models:
        m.runner.use_cuda_graphs(GRAPH_MAX_WIDTH, capture=False)
    assert_same_tokens(models, SPECS[2], "se", SEEDED)
    assert all(m.runner.graphs.stats["padded"] for m in models)


def test_same_tokens_with_a_nested_drafter(tiny):
    """A nested view of the deep model drafts for the ensemble of the other two; its own cache
    (entries at several depths, deferred hidden states) is reused too."""
    def drafter():
        return NestedDrafter(tiny[2].runner, [1, 2, 4], [0.5, 0.5])

    for params in (GREEDY, SEEDED):
        results = assert_same_tokens(tiny[:2], SPECS[2], "ensemble_sd", params, [1, 1, 3], drafter)
        assert sum(r.metrics.prefix_hits[2] for r in results) >= 6


def test_reuse_is_counted_and_saves_the_prefill(tiny):
    """With one slot, each prompt takes over the previous one's slot: the counts are exact, and
    each model scores as many fewer positions as it reused."""
    template = list(range(40, 60))
    prompts = [template, template + [1, 2], template, [9] + template]
    runs = []
    for prefix_cache in (False, True):
        engine = Engine(tiny[:2], SPECS[2], "ensemble", max_batch=1, prefix_cache=prefix_cache)
        runs.append([engine.generate(p, GREEDY)[0] for p in prompts])
    off, on = runs
    # Shared with the slot's tokens, less the prompt's last token: the template, all but its last, none.
    assert [r.metrics.prefix_tokens for r in on] == [[0, 0], [20, 20], [19, 19], [0, 0]]
    assert [r.metrics.prefix_hits for r in on] == [[0, 0], [1, 1], [1, 1], [0, 0]]
    for a, b in zip(off, on):
        assert a.token_ids == b.token_ids
        assert [x - y for x, y in zip(a.metrics.positions_scored, b.metrics.positions_scored)] == \
            b.metrics.prefix_tokens
    assert engine.scheduler.stats.prefix_tokens == [39, 39]
    assert engine.scheduler.stats.prefix_hits == [2, 2]


def test_eviction_under_pressure_never_takes_a_running_slot(tiny):
    """One long request holds a slot while short ones cycle through the other: a request that finds
    no prefix evicts the cached slot, never the running one, and a prompt hits only while the slot
    of its prefix is still cached."""
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (60, 4, 4, 4, 4)]
    prompts = [[7] * 8, [1, 2, 3], [1, 2, 3, 9], [4, 5, 6], [1, 2, 3, 5]]
    outputs = []
    for prefix_cache in (False, True):
        engine = Engine(tiny[:2], SPECS[2], "se", max_batch=SLOTS, prefix_cache=prefix_cache)
        ids = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        results, scheduler = {}, engine.scheduler
        cached = scheduler.prefix_cache.entries
        while engine.has_unfinished():
            results.update((out.request_id, out.result) for out in engine.step() if out.result is not None)
            running = {s.slot for s in scheduler.running}
            assert not running & set(cached) and not set(scheduler.free) & set(cached)
            assert sorted([*running, *scheduler.idle_slots()]) == list(range(SLOTS))
        assert list(results)[-1] == ids[0], "the long request left before the short ones"
        outputs.append([results[i] for i in ids])
    off, on = outputs
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    # [1, 2, 3, 9] takes [1, 2, 3]'s slot over; [4, 5, 6] evicts it, so [1, 2, 3, 5] finds nothing.
    assert [r.metrics.prefix_tokens for r in on] == [[0, 0], [0, 0], [3, 3], [0, 0], [0, 0]]


def check_overwritten_slot_is_not_reused(tiny) -> None:
    """A prompt emits the same tokens again after another engine on the same models has written its
    cached slot (leaving it cached there, and longer) and after gammas='auto' re-measured its costs
    in that slot."""
    prompt, other = list(range(100, 130)), list(range(200, 240))
    engine = Engine(tiny[:2], SPECS[2], "se", "auto", max_batch=1)
    expected = engine.generate(prompt, GREEDY)[0].token_ids
    Engine(tiny[:2], SPECS[2], "se", max_batch=1).generate(other, GREEDY)
    assert engine.generate(prompt, GREEDY)[0].token_ids == expected
    engine.refresh_costs()
    assert engine.generate(prompt, GREEDY)[0].token_ids == expected


def test_an_overwritten_slot_is_not_reused(tiny):
    check_overwritten_slot_is_not_reused(tiny)


def test_reusing_an_overwritten_slot_is_caught(tiny, monkeypatch):
    """Planted bug: the cache trusts an entry whatever wrote into its slot since."""
    monkeypatch.setattr(PrefixCache, "held", lambda self, slot, entry, m:
                        min(entry.rows[m], self.runners[m].lengths[slot]))
    with pytest.raises(AssertionError):
        check_overwritten_slot_is_not_reused(tiny)


def test_the_benchmark_runs_end_to_end(tmp_path):
    """bench.prefix_cache on the tiny models: every cached run reuses the template, emits the off run's tokens."""
    prefix_cache.main(["--models", "tiny-random-llama", "tiny-random-qwen2", "--limit", "2", "--max-new-tokens", "4",
                       "--no-alone", "--out", str(tmp_path)])
    stem = f"prefix-cache-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    runs = json.loads((tmp_path / f"{stem}.json").read_text())["runs"]
    for method in ("ensemble", "se"):
        on, off = runs[f"{method}/on"], runs[f"{method}/off"]
        assert [r["token_ids"] for r in on] == [r["token_ids"] for r in off]
        assert all(min(r["prefix_tokens"]) > 1000 for r in on) and not any(map(sum, (r["prefix_tokens"] for r in off)))
    assert "| se | on | 2 |" in (tmp_path / f"{stem}.md").read_text()
