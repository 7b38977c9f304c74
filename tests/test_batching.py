"""Batched decoding: per-sequence state, results independent of batch composition, continuous batching."""

import random
from dataclasses import replace

import pytest
import torch

from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import AutoGammas, ForwardCost
from se_engine.sampling import SamplingParams

NAMES = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-qwen2-deep"]
SLOTS = 16


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(NAMES, max_batch=SLOTS, max_len=128)


def mixed_requests(count: int, seed: int, temperature: float) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 1 .. 30 tokens with their own lengths, seeds, sampling settings and stop tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 30))] for _ in range(count)]
    params = [SamplingParams(temperature=temperature and rng.choice([temperature, 0.7, 1.3]),
                             top_p=rng.choice([1.0, 0.9]) if temperature else 1.0, seed=rng.randrange(2**31),
                             max_new_tokens=rng.randint(5, 40), stop_token_ids=(rng.randrange(256),),
                             ignore_eos=True) for _ in range(count)]
    return prompts, params


def stop_mid_way(models, spec, prompts, params) -> list[SamplingParams]:
    """Every other request gets, as its stop token, a token its greedy ensemble output emits half-way,
    so that sequences finish at different ticks."""
    outputs = alone(models, spec, "ensemble", None, prompts, params)
    return [replace(p, stop_token_ids=(out[len(out) // 2],)) if i % 2 else p
            for i, (p, out) in enumerate(zip(params, outputs))]


def alone(models, spec, method, gammas, prompts, params) -> list[list[int]]:
    engine = Engine(models, spec, method, gammas, max_batch=1)
    return [engine.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]


CASES = [(EnsembleSpec.weighted([0.6, 0.4]), 2), (EnsembleSpec.contrastive(0.2), 2),
         (EnsembleSpec.weighted([0.2, 0.3, 0.5]), 3)]


@pytest.mark.parametrize("spec,n", CASES, ids=["weighted-2", "contrastive-2", "weighted-3"])
@pytest.mark.parametrize("method,gammas", [("ensemble", None), ("ensemble_sd", None), ("se", "mixed")])
def test_greedy_batch_equals_each_alone(tiny, spec, n, method, gammas):
    """16 mixed-length prompts decoded together emit what each emits alone."""
    models = tiny[:n]
    gammas = [3, 1, 2][:n] if gammas == "mixed" else None
    prompts, params = mixed_requests(16, seed=n, temperature=0)
    params = stop_mid_way(models, spec, prompts, params)
    batched = [r.token_ids for r in Engine(models, spec, method, gammas).generate(prompts, params)]
    assert batched == alone(models, spec, method, gammas, prompts, params)
    assert sum(len(t) < p.max_new_tokens for t, p in zip(batched, params)) >= 8, "stop tokens were not hit"


@pytest.mark.parametrize("n,auto", [(2, False), (3, False), (2, True)], ids=["2", "3", "2-auto-gammas"])
def test_seeded_sampling_ignores_batch_composition_and_order(tiny, n, auto):
    """Counter-based randomness keyed on (seed, position): the same tokens alone, in a batch, and
    in a shuffled batch of fewer slots (so that other requests wait and join mid-way). Automatic
    draft lengths depend only on the sequence's own history (and fixed costs), so they too."""
    spec = EnsembleSpec.weighted([1.0] * n)
    prompts, params = mixed_requests(12, seed=10 + n, temperature=1.0)
    gammas = AutoGammas([ForwardCost(0.01, 0.001), ForwardCost(0.1, 0.004)]) if auto else [2, 1, 3][:n]
    solo = alone(tiny[:n], spec, "se", gammas, prompts, params)
    batched = Engine(tiny[:n], spec, "se", gammas).generate(prompts, params)
    assert [r.token_ids for r in batched] == solo
    order = list(range(12))
    random.Random(0).shuffle(order)
    shuffled = Engine(tiny[:n], spec, "se", gammas, max_batch=5).generate([prompts[i] for i in order],
                                                                        [params[i] for i in order])
    assert [shuffled[order.index(i)].token_ids for i in range(12)] == solo


def test_requests_joining_and_leaving_do_not_change_others(tiny):
    """submit / step / abort between ticks: late arrivals, an early cancel, queueing for a slot."""
    spec = EnsembleSpec.weighted([0.5, 0.5])
    prompts, params = mixed_requests(6, seed=3, temperature=0.8)
    solo = alone(tiny[:2], spec, "se", [3, 1], prompts, params)
    engine = Engine(tiny[:2], spec, "se", [3, 1], max_batch=3)
    ids = {engine.submit(prompts[0], params[0]): 0, engine.submit(prompts[1], params[1]): 1}
    done: dict[int, list[int]] = {}
    streamed: dict[int, list[int]] = {}
    tick = 0
    while engine.has_unfinished() or tick < 6:
        if tick in (2, 3, 5):  # late arrivals; the fourth and fifth wait for a free slot
            for i in {2: (2, 3), 3: (4,), 5: (5,)}[tick]:
                ids[engine.submit(prompts[i], params[i])] = i
        if tick == 4:
            victim = next(r for r, i in ids.items() if i == 3)
            engine.abort(victim)  # cancelled mid-generation: its slot goes to a waiting request
        for out in engine.step():
            streamed.setdefault(ids[out.request_id], []).extend(out.token_ids)
            if out.result is not None:
                done[ids[out.request_id]] = out.result.token_ids
        tick += 1
    assert sorted(done) == [0, 1, 2, 4, 5]
    for i, tokens in done.items():
        assert tokens == solo[i] == streamed[i]
    assert sorted(engine.scheduler.idle_slots()) == [0, 1, 2] and not engine.scheduler.running


def test_each_tick_runs_each_model_at_most_once(tiny):
    """A batch shares forwards: per tick at most one forward per model, and far fewer forwards
    than the same requests decoded one at a time."""
    spec = EnsembleSpec.weighted([0.5, 0.5])
    prompts, params = mixed_requests(8, seed=4, temperature=1.0)
    engine = Engine(tiny[:2], spec, "se", [3, 1])
    engine.generate(prompts, params)
    stats = engine.scheduler.stats
    assert all(f <= stats.ticks for f in stats.forwards)
    solo = Engine(tiny[:2], spec, "se", [3, 1], max_batch=1)
    solo.generate(prompts, params)
    assert sum(stats.forwards) < 0.5 * sum(solo.scheduler.stats.forwards)


def test_expensive_model_waits_to_serve_many_at_once(tiny):
    """Deferring the larger model while others draft cuts its forwards and changes no token."""
    spec = EnsembleSpec.weighted([0.5, 0.5])
    prompts, params = mixed_requests(8, seed=5, temperature=1.0)
    outputs, forwards = [], []
    for defer in (False, True):
        engine = Engine(tiny[:2], spec, "se", [4, 1], proposer_order=[0, 1])
        if not defer:
            engine.scheduler.max_stall = 0  # the large model runs whenever a sequence needs it
        outputs.append([r.token_ids for r in engine.generate(prompts, params)])
        forwards.append(engine.scheduler.stats.forwards)
    assert outputs[0] == outputs[1]
    assert forwards[1][1] < 0.8 * forwards[0][1], forwards


def test_same_prompt_requests_share_one_prefill(tiny):
    """Requests with the prompt of a sequence still in prefill copy its caches (KV extension fork)
    instead of recomputing them, and emit what they emit alone; if that sequence is aborted first,
    they prefill themselves."""
    spec = EnsembleSpec.weighted([0.5, 0.5])
    prompt = list(range(40, 70))
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=12, ignore_eos=True) for s in range(5)]
    one = Engine(tiny[:2], spec, "se", [3, 1], max_batch=1, prefix_cache=False)  # each prefills in full
    solo = [one.generate(prompt, p)[0] for p in params]
    results = Engine(tiny[:2], spec, "se", [3, 1]).generate([prompt] * 5, params)
    assert [r.token_ids for r in results] == [r.token_ids for r in solo]
    # The first prefills; the others score exactly what they score alone, less the prompt.
    assert results[0].metrics.positions_scored == solo[0].metrics.positions_scored
    for got, ref in zip(results[1:], solo[1:]):
        assert got.metrics.positions_scored == [n - len(prompt) for n in ref.metrics.positions_scored]

    engine = Engine(tiny[:2], spec, "se", [3, 1])
    first = engine.submit(prompt, params[0])
    second = engine.submit(prompt, params[1])
    engine.abort(first)  # before any tick: the copy has no source and prefills itself
    outputs = [o for _ in range(40) for o in engine.step() if o.request_id == second]
    assert outputs[-1].result.token_ids == solo[1].token_ids


def test_free_slots_go_to_the_groups_in_turn(tiny):
    """Waiting requests are admitted one group at a time, in turn, FIFO within a group: with one slot,
    groups A and B of three requests each and a lone C submitted after them run A1 B1 C A2 B2 A3 B3
    (first come, first served would run C last), and each emits what it emits alone."""
    engine = Engine(tiny[:2], EnsembleSpec.weighted([0.5, 0.5]), "se", [3, 1], max_batch=1, prefix_cache=False)
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=4, ignore_eos=True)
    prompts = {name: [10 + i, 20 + i] for i, name in enumerate(["A1", "A2", "A3", "B1", "B2", "B3", "C"])}
    solo = {name: engine.generate(p, params)[0].token_ids for name, p in prompts.items()}
    names = {engine.submit(prompts[name], params, group=name[0] if name != "C" else None): name
             for name in ["A1", "A2", "A3", "B1", "B2", "B3", "C"]}
    finished = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.result is not None:
                finished.append(names[out.request_id])
                assert out.result.token_ids == solo[names[out.request_id]]
    assert finished == ["A1", "B1", "C", "A2", "B2", "A3", "B3"]


def test_engine_request_api_errors(tiny):
    with pytest.raises(ValueError, match="max_batch=32 but the loaded models hold 16"):
        Engine(tiny[:2], None, "se", max_batch=32)
    engine = Engine(tiny[:2], None, "se", max_batch=2)
    request = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
    with pytest.raises(RuntimeError, match="1 submitted requests are unfinished"):
        engine.generate([1, 2], SamplingParams())
    engine.abort(request)
    engine.abort(request)  # twice: a no-op
    assert not engine.has_unfinished() and not engine.scheduler.has_work()
    stream = engine.stream([4, 5], SamplingParams(max_new_tokens=30, ignore_eos=True))
    next(stream)
    stream.close()  # a consumer that stops early cancels its request
    assert not engine.has_unfinished() and sorted(engine.scheduler.idle_slots()) == [0, 1]
