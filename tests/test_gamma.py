"""Automatic draft lengths: the choice follows costs and acceptance, and decoding stays exact."""

import pytest
import torch

from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import AutoGammas, ForwardCost, measure_costs
from se_engine.methods import POLICIES
from se_engine.sampling import SamplingParams

NAMES = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-qwen2-deep"]
CHEAP, DEAR = ForwardCost(0.010, 0.001), ForwardCost(0.100, 0.004)
SE, SD = POLICIES["se"], POLICIES["ensemble_sd"]
THRESHOLD = 0.5  # near the median of the tiny models' top probabilities (quartiles about 0.3 and 0.7)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(NAMES, max_batch=4, max_len=160)


def acceptance(accepted: int, tested: int) -> list[float]:
    counts = [0.0, 0.0]
    AutoGammas([CHEAP, DEAR]).observe(counts, tested, accepted)
    return counts


def test_auto_gamma_follows_costs_and_acceptance():
    auto = AutoGammas([CHEAP, DEAR])
    cheap_proposer = [auto.choose(0, acceptance(a, 20), False, {1: 1}, SE) for a in (20, 16, 10, 2)]
    assert cheap_proposer == sorted(cheap_proposer, reverse=True), "more acceptance, longer drafts"
    assert cheap_proposer[0] >= 6 and cheap_proposer[-1] <= 2, cheap_proposer
    # The dear model drafts once, where its first draft is free, and never pays for a second.
    assert auto.choose(1, acceptance(20, 20), True, {0: 1}, SE) == 1
    # Equal costs and poor acceptance: a scoring forward per token is the best there is.
    assert AutoGammas([DEAR, DEAR]).choose(0, acceptance(2, 20), False, {1: 1}, SE) == 1
    with pytest.raises(ValueError, match="max_gamma"):
        AutoGammas([CHEAP, DEAR], max_gamma=0)
    for prior, decay in (((1.5, 2.0), 0.8), ((0.8, 0.0), 0.8), ((0.8, 2.0), 1.5)):
        with pytest.raises(ValueError, match="prior"):
            AutoGammas([CHEAP, DEAR], prior=prior, decay=decay)


def test_auto_gamma_prices_who_scores_in_ensemble_sd():
    """ensemble_sd over models 0 (CHEAP) and 1 (DEAR): a member proposer also feeds its last draft
    to score it, a drafter (runner 2) outside the ensemble does not, and pays for model 0 scoring
    instead. Each choice is the argmax of its rate written out by hand; the drafter's differs from
    what an extra own forward would give (the rule before drafters were priced apart)."""
    drafter = ForwardCost(0.03, 0.0)
    auto = AutoGammas([CHEAP, DEAR, drafter])
    differs = 0
    for accepted in (11, 15, 19):
        counts = acceptance(accepted, 20)
        a = auto.estimate(counts)

        def best(seconds) -> int:
            rate = {g: ((1 - a ** g) / (1 - a) + a ** g) / seconds(g) for g in range(1, auto.max_gamma + 1)}
            return max(rate, key=rate.get)

        scorers = {0: 1, 1: 1}
        assert auto.choose(0, counts, False, scorers, SD) == best(lambda g: (g + 1) * CHEAP(1) + DEAR(1 + g))
        outside = best(lambda g: g * drafter(1) + CHEAP(1 + g) + DEAR(1 + g))
        assert auto.choose(2, counts, False, scorers, SD) == outside
        differs += outside != best(lambda g: (g + 1) * drafter(1) + CHEAP(1 + g) + DEAR(1 + g))
    assert differs


def test_measure_costs_leaves_the_slot_empty(tiny):
    costs = measure_costs([m.runner for m in tiny[:2]], slot=1, max_k=5, context=16, reps=2)
    assert all(c(1) > 0 and c(5) >= c(1) for c in costs)
    assert all(m.runner.lengths[1] == 0 for m in tiny[:2])
    with pytest.raises(ValueError, match="max_k must be >= 2"):
        measure_costs([tiny[0].runner], slot=1, max_k=1)


@pytest.mark.parametrize("method", ["se", "ensemble_sd"])
@pytest.mark.parametrize("n", [2, 3])
def test_greedy_identity_with_auto_gammas(tiny, method, n):
    spec = EnsembleSpec.weighted([1.0] * n)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    prompts = [[5, 17, 99, 3], [200, 1], [7] * 12]
    expected = [r.token_ids for r in Engine(tiny[:n], spec, "ensemble").generate(prompts, params)]
    engine = Engine(tiny[:n], spec, method, AutoGammas([CHEAP, DEAR, DEAR][:n]))
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == expected
    lengths = {g for r in results for _, g in r.metrics.draft_lengths}
    assert len(lengths) > 1, "the draft lengths never changed"
    assert all(g == 1 for r in results for m, g in r.metrics.draft_lengths if m != 0)


def test_engine_measures_costs_for_auto(tiny):
    engine = Engine(tiny[:2], None, "se", "auto")
    assert len(engine.scheduler.draft_lengths.costs) == 2
    result = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=12, seed=0))[0]
    assert result.metrics.draft_lengths and result.metrics.mean_draft_length[0] is not None
    before = engine.scheduler.draft_lengths.costs
    engine.refresh_costs()
    assert len(engine.scheduler.draft_lengths.costs) == 2 and engine.scheduler.draft_lengths.costs is not before
    with pytest.raises(ValueError, match="costs matter only"):
        Engine(tiny[:2], None, "se", [2, 1]).refresh_costs()
    with pytest.raises(ValueError, match="gammas must be 'auto', an AutoGammas or 2 draft lengths"):
        Engine(tiny[:2], None, "se", "fast")
    with pytest.raises(ValueError, match="AutoGammas has costs for 3 models"):
        Engine(tiny[:2], None, "se", AutoGammas([CHEAP, DEAR, DEAR]))


@pytest.mark.parametrize("method", ["se", "ensemble_sd"])
def test_a_proposal_ends_after_its_first_unsure_draft(tiny, method):
    """Greedy, so every draft is known: model m's draft at position p is its argmax given the output
    before p. Walking the proposals (metrics.draft_lengths) over the output checks each length
    against the rule: every draft but the last confident, the last unsure unless the cap was reached."""
    spec, cap, new = EnsembleSpec.weighted([1.0, 1.0]), 3, 40
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    prompt = [5, 17, 99, 3]
    expected = Engine(tiny[:2], spec, "ensemble").generate(prompt, params)[0].token_ids
    result = Engine(tiny[:2], spec, method, [cap, cap], confidence_threshold=THRESHOLD).generate(prompt, params)[0]
    assert result.token_ids == expected
    ids = prompt + expected
    logits = []  # [model][p - len(prompt)]: the logits at position p, from the output before p
    for model in tiny[:2]:
        model.runner.truncate([0], [0])
        logits.append(model.runner.forward([0], [ids[:-1]], [new]).float())
        model.runner.truncate([0], [0])
    pos, ended_early, full = len(prompt) + 1, 0, 0  # the first token comes from the ensemble
    for m, length in result.metrics.draft_lengths:
        row = [logits[m][p - len(prompt)] for p in range(pos, min(pos + length, len(ids)))]
        accepted = 0
        while accepted < len(row) and int(row[accepted].argmax()) == ids[pos + accepted]:
            accepted += 1
        # Drafts after a rejected one saw a prefix the output does not hold: their confidence is unknown.
        confident = [bool(x.softmax(-1).max() >= THRESHOLD) for x in row[:accepted + 1]]
        assert all(confident[:length - 1]), (pos, length, confident)
        if len(confident) == length:
            if length < min(cap, len(ids) - pos):
                assert not confident[-1], (pos, length)
                ended_early += 1
            else:
                full += 1
        pos += accepted + 1 if accepted < length else length + (method == "ensemble_sd")
    assert pos >= len(ids) and ended_early and full, (pos, ended_early, full)
    with pytest.raises(ValueError, match="confidence_threshold"):
        Engine(tiny[:2], spec, method, confidence_threshold=1.5)
