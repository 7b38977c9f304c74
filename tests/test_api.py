"""Ensemble specs, sampling parameters and the engine API: semantics and bad inputs."""

import math
from dataclasses import replace

import pytest
import torch

from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.sampling import SamplingParams, process_logits, sample
from se_engine.token_text import encode_text
from se_engine.verify import verify_reference


@pytest.fixture(scope="module")
def pair(tiny_models):
    return tiny_models(["tiny-random-llama", "tiny-random-qwen2"], dtype=torch.float32, max_len=96)


def test_weighted_mixes_processed_probabilities():
    a, b = torch.randn(3, 50), torch.randn(3, 50)
    spec = EnsembleSpec.weighted([1, 3])  # normalised to 0.25 / 0.75
    r = spec.target([a, b], 0.7, 10, 0.9)
    expected = 0.25 * process_logits(a, 0.7, 10, 0.9) + 0.75 * process_logits(b, 0.7, 10, 0.9)
    torch.testing.assert_close(r, expected)
    greedy = spec.target([a, b], 0, 10, 0.9)
    assert torch.equal(greedy.argmax(-1), (0.25 * a.softmax(-1) + 0.75 * b.softmax(-1)).argmax(-1))


def test_contrastive_processes_the_combined_logits():
    a, b = torch.randn(2, 40), torch.randn(2, 40)
    r = EnsembleSpec.contrastive(0.3).target([a, b], 0.8, 0, 0.7)
    torch.testing.assert_close(r, process_logits(a - 0.3 * b, 0.8, 0, 0.7))


def test_custom_ensembles():
    a, b = torch.randn(2, 30), torch.randn(2, 30)
    spec = EnsembleSpec.custom(lambda ls: torch.maximum(ls[0], ls[1]), 2)
    torch.testing.assert_close(spec.target([a, b], 1.0, 0, 1.0), torch.maximum(a, b).softmax(-1))
    probs = EnsembleSpec.custom(lambda ps: ps[0] * ps[1], 2, on="probs").target([a, b], 1.0, 0, 1.0)
    expected = a.softmax(-1) * b.softmax(-1)
    torch.testing.assert_close(probs, expected / expected.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="shape"):
        EnsembleSpec.custom(lambda ls: ls[0][:, :3], 2).target([a, b], 1.0, 0, 1.0)


def test_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert process_logits(logits, 1.0, 2, 1.0).nonzero()[:, 1].tolist() == [0, 1]
    p = process_logits(logits, 1.0, 0, 0.7)  # 0.5 + 0.2 reaches 0.7: the first two
    torch.testing.assert_close(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))


def test_sample_follows_probabilities():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    n = 20000
    draws = sample(probs.expand(n, 4), torch.full((n,), 7), torch.arange(n), 3)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert freq[2] == 0
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / n)  # 4 sigma


def test_verify_reference_ragged_batch_greedy():
    """Two sequences of 3 and 2 positions; greedy: accept while the draft is the ensemble argmax."""
    V = 11
    a, b = torch.randn(5, V), torch.randn(5, V)
    drafts = torch.tensor([3, 7, 1, 4, 9])
    a[torch.arange(5), drafts] += 50.0  # the proposer (model 0) drafted its argmax
    b[torch.arange(5), drafts] += 50.0  # ... and the ensemble agrees,
    b[1, 2] += 100.0                    # except at seq 0's second position, where it wants token 2
    res = verify_reference([a, b], EnsembleSpec.weighted([0.2, 0.8]), drafts, torch.zeros(5, dtype=torch.long),
                           torch.tensor([4, 5, 6, 9, 10]), torch.tensor([0, 3, 5]),
                           [SamplingParams(temperature=0)] * 2, torch.tensor([1, 2]))
    assert res.num_accepted.tolist() == [1, 2]
    assert res.num_emitted.tolist() == [2, 2]
    assert res.tokens.tolist() == [[3, 2, -1], [4, 9, -1]]


@pytest.mark.parametrize("make,match", [
    (lambda: EnsembleSpec.weighted([0.5, -0.5]), ">= 0"),
    (lambda: EnsembleSpec.weighted([0.5, float("nan")]), "finite"),
    (lambda: EnsembleSpec.weighted([0, 0]), "all be zero"),
    (lambda: EnsembleSpec.contrastive(1.5), r"alpha must be in \[0, 1\]"),
    (lambda: EnsembleSpec.contrastive(-0.1), r"alpha must be in \[0, 1\]"),
    (lambda: SamplingParams(temperature=-1), "temperature"),
    (lambda: SamplingParams(top_p=0), "top_p"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: SamplingParams(top_k=-2), "top_k"),
    (lambda: SamplingParams(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_specs_and_params(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_engine_inputs(pair):
    with pytest.raises(ValueError, match="defined over 3 models but 2"):
        Engine(pair, EnsembleSpec.weighted([0.2, 0.3, 0.5]), "se")
    with pytest.raises(ValueError, match=r"gammas must be ints in \[1, 16\], got \[0, 1\]"):
        Engine(pair, None, "se", [0, 1])
    with pytest.raises(ValueError, match="gammas must be 'auto', an AutoGammas or 2 draft lengths"):
        Engine(pair, None, "se", [1])
    with pytest.raises(ValueError, match="method must be one of"):
        Engine(pair, None, "speculative")
    with pytest.raises(ValueError, match="needs at least two models"):
        Engine(pair[:1], None, "se")
    engine = Engine(pair, None, "se")
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate("", SamplingParams())
    with pytest.raises(ValueError, match="exceeds max_len=96"):
        engine.generate([1] * 90, SamplingParams(max_new_tokens=10))


def test_stop_strings_logprobs_and_stream(pair):
    engine = Engine(pair, EnsembleSpec.weighted([0.5, 0.5]), "se", [3, 1])
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, logprobs=True)
    full = engine.generate("abc", params)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40 == len(full.logprobs)
    assert all(lp <= 0 for lp in full.logprobs)
    stop = full.text[10:13]
    cut = engine.generate("abc", SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    streamed = "".join(c.text for c in engine.stream("abc", params))
    assert streamed == full.text
    seeded = [engine.generate("abc", SamplingParams(seed=5, max_new_tokens=20))[0].token_ids for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_min_tokens_holds_back_stop_strings(pair):
    """A stop string counts only where it starts after the text of the first min_tokens tokens."""
    engine = Engine(pair, EnsembleSpec.weighted([0.5, 0.5]), "se", [3, 1])
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    full = engine.generate("abc", params)[0]
    stop = "N"  # the greedy text: "\ufffdBBBBB\ufffdNkN..." and again after its 20th token
    start = len(engine.tokenizer.decode(full.token_ids[:20]))
    assert 0 <= full.text.find(stop) < start <= full.text.find(stop, start)
    early = engine.generate("abc", replace(params, stop=(stop,)))[0]
    assert early.text == full.text[:full.text.find(stop)] and early.finish_reason == "stop"
    late = engine.generate("abc", replace(params, stop=(stop,), min_tokens=20))[0]
    assert late.text == full.text[:full.text.find(stop, start)] and late.finish_reason == "stop"
    assert late.token_ids == full.token_ids[:len(late.token_ids)] and len(late.token_ids) >= 20


def test_uniforms_stay_below_one_and_one_hot_sampling_is_exact(monkeypatch):
    """The largest hash value must map below 1.0: u == 1 gives E = 0 and a NaN race that once
    made greedy (one-hot) sampling pick a zero-probability token."""
    import se_engine.sampling as sampling

    monkeypatch.setattr(sampling, "_key", lambda seed, pos, stream: torch.full_like(seed, 0xFFFFFFFF))
    assert float(sampling.uniform(torch.tensor([1]), torch.tensor([0]), 1)[0]) < 1.0
    one_hot = torch.zeros(1, 9)
    one_hot[0, 4] = 1.0
    monkeypatch.setattr(sampling, "uniform", lambda seed, pos, stream, n=None: torch.ones(1, n))
    assert int(sampling.sample(one_hot, torch.tensor([1]), torch.tensor([0]), 3)[0]) == 4


def test_acceptance_by_draft_depth_adds_up(pair):
    """Per-depth counters: every tested draft is counted at its depth in its proposal, and a draft
    at depth d is tested only after the one at d - 1 was accepted."""
    engine = Engine(pair, EnsembleSpec.weighted([0.5, 0.5]), "se", [3, 2])
    m = engine.generate(["hello world", "abc"], SamplingParams(temperature=1.0, seed=3, max_new_tokens=40))[0].metrics
    assert [sum(d) for d in m.tested_at_depth] == m.drafts_tested
    assert [sum(d) for d in m.accepted_at_depth] == m.drafts_accepted
    assert len(m.tested_at_depth[0]) == 3 and len(m.tested_at_depth[1]) <= 2
    for tested, accepted in zip(m.tested_at_depth, m.accepted_at_depth):
        assert all(t <= a for t, a in zip(tested[1:], accepted))
    assert 0 < m.accepted_at_depth[0][0] < m.tested_at_depth[0][0]  # both outcomes happened


def test_generation_ends_at_every_end_of_generation_token(pair):
    """The tiny tokenizer's EOS is <|endoftext|> (256); <|im_end|> (258) ends a turn and a generation
    too. Sampled with the same seed, a generation that stops is the one that ignores them, cut after
    the first of either."""
    engine = Engine(pair, None, "se", [3, 1])
    assert engine.eos_ids == {256, 258}
    ends = set()
    for seed in range(24):
        params = SamplingParams(temperature=1.5, seed=seed, max_new_tokens=48)
        free = engine.generate([1, 2, 3], SamplingParams(temperature=1.5, seed=seed, max_new_tokens=48,
                                                        ignore_eos=True))[0].token_ids
        stopped = engine.generate([1, 2, 3], params)[0]
        first = next((i for i, t in enumerate(free) if t in engine.eos_ids), None)
        if first is None:
            assert stopped.token_ids == free and stopped.finish_reason == "length"
        else:
            assert stopped.token_ids == free[:first + 1] and stopped.finish_reason == "stop"
            ends.add(free[first])
    assert 258 in ends, "no generation reached <|im_end|>: the test proves nothing"


@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_text_encodes_as_transformers_encodes_it(pair, split_special_tokens):
    """encode_text calls the Rust backend directly: the same ids as transformers' own call, special
    tokens written in the text included (and split where the tokenizer is told to split them)."""
    texts = ["", " ", "héllo 🙂 wörld\n\n\tx", "  two  spaces ", "def f(x):\n    return x ** 2\n", "a" * 3000,
             "日本語のテキスト", "\u200b zero width", "12345 678.9"]
    for model in pair:
        tok = model.tokenizer
        special = "".join(tok.all_special_tokens)
        for text in [f"{special} in the middle {special}", *texts]:  # first: before a call changes the backend's state
            tok.split_special_tokens = split_special_tokens
            try:
                assert encode_text(tok, text) == tok(text, add_special_tokens=False)["input_ids"], repr(text)
            finally:
                tok.split_special_tokens = False
