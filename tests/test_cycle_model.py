"""The analytic cycle model (se_engine.gamma.cycle_rate) against the engine's own forward counts.

Two stand-in models emit the same distribution at every position, so that every draft of a model
is accepted independently with a known probability: the model's assumption holds exactly, and the
forwards each model makes per emitted token must match it. Unit costs make the model's "seconds"
a count of one model's forwards. Over 16 x 1000 tokens the counts land within 0.5% of the model
(the last, capped proposal of each sequence); leaving out se's free first draft moves it by 2.4%."""

import pytest
import torch

from se_engine import load_model
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import ForwardCost, cycle_rate
from se_engine.runner import LoadedModel
from se_engine.sampling import SamplingParams


class ConstantRunner:
    """A runner whose logits are the same row at every position."""

    def __init__(self, logits: torch.Tensor, max_batch: int = 16, max_len: int = 4096):
        self.logits, self.vocab_size = logits, logits.numel()
        self.max_batch, self.max_len, self.device = max_batch, max_len, torch.device("cpu")
        self.lengths = [0] * max_batch
        self.writes = [0] * max_batch

    def forward(self, rows, tokens, num_logits):
        for r, t in zip(rows, tokens):
            self.lengths[r] += len(t)
            self.writes[r] += 1
        return self.logits.expand(sum(num_logits), -1).clone()

    def truncate(self, rows, lengths):
        for r, n in zip(rows, lengths):
            self.lengths[r] = n

    def fork(self, src, dst):
        for r in dst:
            self.lengths[r] = self.lengths[src]
            self.writes[r] += 1


@pytest.mark.parametrize("method,gammas", [("se", [3, 2]), ("se", [5, 1]), ("ensemble_sd", [4, 1]),
                                           ("ensemble_sd", [1, 1, 5])], ids=["se-3-2", "se-5-1", "sd", "sd-drafter"])
def test_cycle_model_predicts_forwards_per_token(method, gammas):
    """Three gammas: a third stand-in, outside the ensemble, drafts for it."""
    tokenizer = load_model("tiny-random-llama").tokenizer
    g = torch.Generator().manual_seed(0)
    vocab = 259
    logits = [torch.randn(vocab, generator=g) * 2 for _ in gammas]
    models = [LoadedModel("p", ConstantRunner(logits[0]), tokenizer, 1),
              LoadedModel("v", ConstantRunner(logits[1]), tokenizer, 2)]
    drafter = ConstantRunner(logits[2]) if len(gammas) == 3 else None
    engine = Engine(models, EnsembleSpec.weighted([0.5, 0.5]), method, gammas, drafter=drafter)
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=1000, ignore_eos=True) for s in range(16)]
    results = engine.generate([[5, 6, 7]] * 16, params)
    tokens = sum(r.metrics.tokens - 1 for r in results)  # the first token comes with the prefill
    runners = range(len(gammas))
    forwards = [sum(r.metrics.forwards[m] - (m < 2) for r in results) for m in runners]  # the drafter has no prefill
    # Acceptance of runner m's drafts: sum_x min(p_m(x), r(x)) with r the 0.5 / 0.5 mixture of the models.
    p = [x.softmax(0) for x in logits]
    r = 0.5 * (p[0] + p[1])
    acceptance = [float(torch.minimum(pm, r).sum()) for pm in p]
    if drafter is not None:  # tokens per token the drafter feeds (a cost per token): its c(2) term
        fed = sum(r.metrics.positions_scored[2] - 3 for r in results)  # less the prompts, fed with a first draft
        per_token = [ForwardCost(0.0, float(k == 2)) for k in runners]
        assert tokens / fed == pytest.approx(cycle_rate(method, per_token, gammas, acceptance), rel=0.01)
    for m in runners:
        unit = [ForwardCost(float(k == m), 0.0) for k in runners]
        predicted = cycle_rate(method, unit, gammas, acceptance)  # tokens per forward of runner m
        assert tokens / forwards[m] == pytest.approx(predicted, rel=0.01), (m, acceptance)


def test_cycle_model_limits():
    costs = [ForwardCost(1.0, 0.0), ForwardCost(3.0, 0.0)]
    assert cycle_rate("ensemble", costs) == pytest.approx(1 / 4)
    # Every draft accepted: se emits g_P + g_V tokens per cycle of g_P - 1 + g_V - 1 + 2 forwards.
    assert cycle_rate("se", costs, [4, 1], [1.0, 1.0]) == pytest.approx(5 / (3 * 1 + 3 + 1))
    # Nothing accepted: each proposal yields one token for g_P forwards of P and one of V.
    assert cycle_rate("se", costs, [4, 1], [0.0, 0.0]) == pytest.approx(1 / (4 + 3))
    with pytest.raises(ValueError, match="two models"):
        cycle_rate("se", costs * 2, [1] * 4, [0.5] * 4)
    with pytest.raises(ValueError, match="and a drafter for ensemble_sd"):
        cycle_rate("se", costs + costs[:1], [1] * 3, [0.5] * 3)
    # A drafter whose every draft is accepted: g + 1 tokens for g drafter forwards (one over 2
    # tokens) and one of each model.
    drafter = costs + [ForwardCost(0.5, 0.25)]
    assert cycle_rate("ensemble_sd", drafter, [1, 1, 4], [0, 0, 1.0]) == pytest.approx(5 / (4 * 0.75 + 0.25 + 1 + 3))


@pytest.mark.parametrize("gammas", [[3, 2], [6, 1]])
def test_replay_walk_matches_the_cycle_model(gammas):
    """bench.gamma_replay's walks over coins, with the same acceptance at every position, price se
    and ensemble_sd with a drafter as the cycle model does (the model itself is checked against the
    engine above)."""
    import random

    from bench.gamma_replay import simulate_sd, simulate_se
    from se_engine.gamma import FixedGammas

    costs, acceptance, n = [ForwardCost(0.07, 0.001), ForwardCost(0.17, 0.002), ForwardCost(0.03, 0.004)], [0.8, 0.6, 0.9], 200_000
    coins = random.Random(0).random
    coins = [coins() for _ in range(n)]
    trace = {"beta": [[a] * n for a in acceptance], "confidence": [[1.0] * n] * 3}
    seconds, _ = simulate_se(FixedGammas(gammas), 0.0, trace, coins, costs)
    assert (n - 1) / seconds == pytest.approx(cycle_rate("se", costs[:2], gammas, acceptance[:2]), rel=0.01)
    sd = [1, 1, gammas[0]]
    seconds, _ = simulate_sd(FixedGammas(sd), 0.0, trace, coins, costs)
    assert (n - 1) / seconds == pytest.approx(cycle_rate("ensemble_sd", costs, sd, acceptance), rel=0.01)


def test_replay_ranks_policies_on_traces(tmp_path):
    """The replay over bursty and flat synthetic traces: every (policy, threshold) has a row, fixed
    ones rank as the walk says, and a threshold that the confidence predicts well pays where
    acceptance comes in bursts."""
    import json
    import random

    from bench import gamma_replay

    rng = random.Random(1)
    good = lambda t: (t // 20) % 2  # noqa: E731  stretches of 20 positions
    bursty = [{"beta": [[0.98 if good(t) else 0.3 for t in range(120)]] * 3,
               "confidence": [[0.9 if good(t) else 0.2 for t in range(120)]] * 3} for _ in range(3)]
    flat = [{"beta": [[rng.uniform(0.85, 1.0) for _ in range(120)]] * 3, "confidence": [[0.9] * 120] * 3}
            for _ in range(3)]
    costs = [ForwardCost(0.07, 0.001), ForwardCost(0.17, 0.002), ForwardCost(0.03, 0.004)]
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps({"command": "synthetic", "machine": "-", "date": "-", "max_new_tokens": 120,
                                  "models": ["small", "large", "drafter"], "costs": [c.__dict__ for c in costs],
                                  "traces": {"bursty": bursty, "flat": flat}}))
    gamma_replay.main(["--traces", str(traces), "replay", "--seeds", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gamma-replay-cpu.json").read_text())
    assert set(result["methods"]) == {"se", "sd-int4"}
    for method, workloads in result["methods"].items():
        assert set(workloads) == {"bursty", "flat", "mixed"}
        rate = {w: {(r["policy"], r["threshold"]): r["tokens_per_s"] for r in rows} for w, rows in workloads.items()}
        assert all(len(r) == len(gamma_replay.policies(method, costs)) * len(gamma_replay.THRESHOLDS)
                   for r in rate.values())
        fixed = "fixed [6, 1]" if method == "se" else "fixed 8"
        short = "fixed [1, 1]" if method == "se" else "fixed 1"
        assert rate["flat"][fixed, 0.0] > rate["flat"][short, 0.0]  # high acceptance: long drafts pay
        assert rate["flat"][fixed, 0.5] == rate["flat"][fixed, 0.0]  # always confident: the threshold never acts
        assert rate["bursty"][fixed, 0.5] > rate["bursty"][fixed, 0.0]
    assert "| fixed [6, 1] |" in (tmp_path / "gamma-replay-cpu.md").read_text()
