"""Multi-target serving: one engine, one proposer, requests for several targets (single models and
ensembles) batched together. Each request emits what an engine of its own target emits, greedy and
seeded; the proposer runs at most once per tick over the drafts of every target; bad input."""

import json
import random

import pytest
import torch

from bench import multi_target
from se_engine.decode import Scheduler
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.nested import NestedDrafter
from se_engine.sampling import STREAM_DRAFT, SamplingParams

# The last is a second copy of tiny-random-qwen2: as a plain draft model outside a target with
# tiny-random-qwen2 it gets drafts accepted (independent random models never agree), so that the
# draws of its drafts matter there.
NAMES = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-qwen2-deep", "tiny-random-qwen2"]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(NAMES, max_batch=12, max_len=96)


def nested(tiny) -> NestedDrafter:
    """Early-exit views of the deep model, at a threshold that mixes its depths."""
    return NestedDrafter(tiny[2].runner, [1, 2, 4], [0.5, 0.5])


# Each setup: the multi-target engine's models (indices into NAMES), whether a nested view drafts
# (else the first model, a plain small model, drafts: a member of some targets, outside others),
# and targets: name -> (model indices into the engine's models, spec).
SETUPS = {
    "nested": ([0, 1, 2], True, {"llama": ([0], None), "qwen2": ([1], None), "deep": ([2], None),
                                 "weighted": ([0, 1], EnsembleSpec.weighted([0.6, 0.4]))}),
    "plain": ([3, 1, 0], False, {"qwen2": ([1], None), "outside": ([2, 1], EnsembleSpec.weighted([0.4, 0.6])),
                                 "member": ([2, 0], EnsembleSpec.weighted([0.4, 0.6])),
                                 "contrastive": ([1, 2], EnsembleSpec.contrastive(0.2))}),
}
GAMMA = 3


def multi_engine(tiny, setup: str, sampler: str = "auto") -> Engine:
    models, drafts, targets = SETUPS[setup]
    gammas = [1] * len(models) + [GAMMA] if drafts else [GAMMA] + [1] * (len(models) - 1)
    return Engine([tiny[i] for i in models], None, "ensemble_sd", gammas, proposer_order=list(range(len(models))),
                  sampler=sampler, drafter=nested(tiny) if drafts else None, targets=targets)


def own_engine(tiny, setup: str, name: str) -> Engine:
    """An engine of the target alone: its members as the models, the proposer as the drafter where it
    is not one of them (as the first to propose where it is)."""
    models, drafts, targets = SETUPS[setup]
    members, spec = targets[name]
    loaded = [tiny[models[i]] for i in members]
    if drafts or 0 not in members:
        drafter = nested(tiny) if drafts else tiny[models[0]].runner
        return Engine(loaded, spec, "ensemble_sd", [1] * len(members) + [GAMMA], drafter=drafter)
    draft = members.index(0)
    order = [draft, *(i for i in range(len(members)) if i != draft)]
    return Engine(loaded, spec, "ensemble_sd", [GAMMA if i == draft else 1 for i in range(len(members))],
                  proposer_order=order)


def requests(setup: str, temperature: float) -> tuple[list[list[int]], list[SamplingParams], list[str]]:
    """Three requests per target, ragged prompts and lengths; one prompt is asked twice of one target
    (the second request copies the first's prefill) and once of another (it prefills itself)."""
    names = list(SETUPS[setup][2])
    rng = random.Random(len(names))
    prompts, params, targets = [], [], []
    for i in range(3 * len(names)):
        prompts.append([rng.randrange(256) for _ in range(rng.randint(2, 20))])
        params.append(SamplingParams(temperature=temperature and rng.choice([temperature, 0.8]),
                                     top_p=rng.choice([1.0, 0.9]) if temperature else 1.0, seed=rng.randrange(2**31),
                                     max_new_tokens=rng.randint(8, 24), ignore_eos=True))
        targets.append(names[i % len(names)])
    prompts[len(names)] = prompts[len(names) + 1] = prompts[0]
    return prompts, params, targets


def check_against_own_engines(tiny, setup: str, temperature: float) -> None:
    """Mixed requests through one engine emit, token for token, what an engine of each request's
    target emits (assertion message: the target's name); the proposer runs at most once per tick,
    fewer times than in the separate engines together, and verify once per target present in the tick."""
    prompts, params, targets = requests(setup, temperature)
    engine = multi_engine(tiny, setup)
    ids = [engine.submit(p, sp, t) for p, sp, t in zip(prompts, params, targets)]
    results, stats, verify_calls = {}, engine.scheduler.stats, 0
    while engine.has_unfinished():
        present = {s.target for s in engine.scheduler.running + list(engine.scheduler.waiting)}
        for out in engine.step():
            if out.result is not None:
                results[out.request_id] = out.result
        assert stats.verify_calls - verify_calls <= len(present)
        verify_calls = stats.verify_calls
    proposer = engine.order[0]
    assert stats.forwards[proposer] <= stats.ticks
    separate_forwards = 0
    for name in SETUPS[setup][2]:
        mine = [i for i, t in enumerate(targets) if t == name]
        own = own_engine(tiny, setup, name)
        expected = own.generate([prompts[i] for i in mine], [params[i] for i in mine])
        assert [results[ids[i]].token_ids for i in mine] == [r.token_ids for r in expected], name
        separate_forwards += own.scheduler.stats.forwards[own.order[0]]
        members = SETUPS[setup][2][name][0]
        for i in mine:  # per-runner metrics: the request's members and the proposer only
            used = [m in members or m == proposer for m in range(len(engine.runner_names))]
            assert [f > 0 for f in results[ids[i]].metrics.forwards] == used, (name, results[ids[i]].metrics.forwards)
    assert stats.forwards[proposer] < separate_forwards


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
@pytest.mark.parametrize("setup", SETUPS)
def test_each_request_emits_what_its_own_engine_emits(tiny, setup, temperature):
    check_against_own_engines(tiny, setup, temperature)


def test_draft_streams_numbered_by_engine_runner_are_caught(tiny, monkeypatch):
    """Planted bug: drafts drawn from the random stream of the proposer's runner index in the engine
    instead of its place among the target's runners. Still the target's distribution, but not the
    tokens its own engine draws: the seeded comparison must fail on a target the proposer is outside."""
    real_draw = Scheduler._draw

    def engine_streams(self, models, spec, stream, seqs):
        return real_draw(self, models, spec, STREAM_DRAFT + models[0] if stream >= STREAM_DRAFT else stream, seqs)

    monkeypatch.setattr(Scheduler, "_draw", engine_streams)
    with pytest.raises(AssertionError, match="qwen2"):
        check_against_own_engines(tiny, "plain", 1.0)


def test_triton_sampler_draws_the_same_tokens(tiny):
    """The fused kernels take each target's runners (an outside proposer as a zero-weight model)."""
    names = list(SETUPS["plain"][2])
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=8, ignore_eos=True) for s in range(len(names))]
    tokens = []
    for sampler in ("torch", "triton"):
        engine = multi_engine(tiny, "plain", sampler)
        tokens.append([r.token_ids for r in engine.generate([[3, 1, 4, 1, 5]] * len(names), params, names)])
    assert tokens[0] == tokens[1]


def test_generate_and_stream_take_targets(tiny):
    engine = multi_engine(tiny, "plain")
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    both = engine.generate([[5, 6, 7], [5, 6, 7]], params, ["qwen2", "member"])
    alone = [own_engine(tiny, "plain", name).generate([5, 6, 7], params)[0] for name in ("qwen2", "member")]
    assert [r.token_ids for r in both] == [r.token_ids for r in alone]
    streamed = [t for out in engine.stream([5, 6, 7], params, "member") for t in out.token_ids]
    assert streamed == alone[1].token_ids
    single = Engine(tiny[:2], None, "ensemble_sd")  # one target: its name may be left out
    assert single.generate([5, 6, 7], params, "default")[0].token_ids == single.generate([5, 6, 7], params)[0].token_ids


def test_bad_input(tiny):
    pair = tiny[:2]
    bad = [(dict(targets={"x": ([], None)}), "target 'x' has no models"),
           (dict(targets={"x": ([2], None)}), r"target 'x': model indices must be distinct ints in \[0, 2\), got \[2"),
           (dict(targets={"x": ([1, 1], None)}), "distinct ints"),
           (dict(targets={"x": ([0, 1], EnsembleSpec.weighted([1.0]))}),
            "target 'x': the ensemble is defined over 1 models but 2 were given"),
           (dict(targets={"x": [1]}), r"target 'x' must be \(model indices, EnsembleSpec or None\)"),
           (dict(targets={"x": ([0], None)}), "target 'x' is the proposer .model 0. alone"),
           (dict(targets={}), "non-empty mapping"),
           (dict(targets={"x": ([1], None)}, ensemble=EnsembleSpec.weighted([1, 1])), "pass ensemble=None"),
           (dict(targets={"x": ([1], None)}, method="se"), "method 'ensemble_sd', got 'se'")]
    for kwargs, match in bad:
        kwargs = {"method": "ensemble_sd", **kwargs}
        with pytest.raises(ValueError, match=match):
            Engine(pair, **kwargs)
    engine = Engine(pair, method="ensemble_sd", targets={"large": ([1], None), "ens": ([0, 1], None)})
    with pytest.raises(ValueError, match=r"unknown target 'nope'; this engine serves \['ens', 'large'\]"):
        engine.submit([1, 2], target="nope")
    with pytest.raises(ValueError, match="unknown target None"):
        engine.submit([1, 2])
    with pytest.raises(ValueError, match="1 targets for 2 prompts"):
        engine.generate([[1], [2]], None, ["ens"])
    assert not engine.has_unfinished()


def test_bench_runs_on_tiny_models(tmp_path):
    """bench.multi_target end to end on the tiny models (both proposers), into a temporary directory."""
    for extra in ([], ["--nested", "1", "2"]):
        multi_target.main(["--models", "tiny-random-llama", "tiny-random-qwen2", "--prompts", "4",
                           "--max-new-tokens", "8", "--no-alone", "--out", str(tmp_path), *extra])
        stem = tmp_path / f"multi-target-{multi_target.device()}"
        result = json.loads(stem.with_suffix(".json").read_text())
        assert [r["requests"] for r in result["rows"]] == [4, 4] and all(r["tokens"] > 0 for r in result["rows"])
        assert result["nested"] == ([1, 2] if extra else None)
        assert "outputs identical in both setups on" in stem.with_suffix(".md").read_text()
