"""Exactness of the speculative methods: greedy identity and the distribution of sampled tokens."""

import itertools
from dataclasses import replace

import pytest
import torch
from scipy.stats import chi2

import se_engine.verify as verify_module
from se_engine.decode import Scheduler
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import AutoGammas, ForwardCost
from se_engine.runner import LoadedModel
from se_engine.sampling import STREAM_ACCEPT, STREAM_DRAFT, SamplingParams, uniform
from se_engine.sources import tiny_random_model, tiny_tokenizer
from se_engine.model import Transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-qwen2-deep"]


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def tiny(request, tiny_models):
    """The default dtype (bf16: the batch-invariant kernels on the CPU), and fp32 beside it."""
    return tiny_models(NAMES, dtype=request.param, max_len=160, device=DEVICE)


GREEDY = [
    (EnsembleSpec.weighted([0.5, 0.5]), 2),
    (EnsembleSpec.weighted([0.8, 0.2]), 2),
    (EnsembleSpec.weighted([0.1, 0.9]), 2),
    (EnsembleSpec.contrastive(0.1), 2),
    (EnsembleSpec.contrastive(0.5), 2),
    (EnsembleSpec.weighted([0.2, 0.3, 0.5]), 3),
    (EnsembleSpec.linear([1.0, -0.2, 0.5]), 3),
]


def check_greedy_identity(models, spec, seed: int, max_new_tokens: int = 48) -> None:
    """Two random prompts: every speculative method and draft length emits the plain ensemble's tokens."""
    n = len(models)
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        prompt = torch.randint(0, 256, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
        expected = Engine(models, spec, "ensemble").generate(prompt, params)[0].token_ids
        assert len(expected) == max_new_tokens
        for method, gammas, threshold in [("ensemble_sd", None, 0.0), ("se", None, 0.0), ("se", [1] * n, 0.0),
                                          ("se", [3] * n, 0.0), ("se", list(range(2, n + 2)), 0.0),
                                          ("ensemble_sd", [4] * n, 0.5), ("se", [4] * n, 0.5)]:
            engine = Engine(models, spec, method, gammas, confidence_threshold=threshold)
            got = engine.generate(prompt, params)[0].token_ids
            assert got == expected, (method, gammas, threshold)


@pytest.mark.parametrize("spec,n", GREEDY, ids=lambda x: getattr(x, "kind", x))
def test_greedy_identity(tiny, spec, n):
    check_greedy_identity(tiny[:n], spec, seed=n)


@pytest.mark.parametrize("spec,n", [GREEDY[0], GREEDY[3], GREEDY[5]], ids=["weighted", "contrastive", "weighted-3"])
def test_greedy_identity_with_min_tokens(tiny, spec, n):
    """A stop token the plain ensemble emits early, suppressed for the first 8 tokens: every method
    emits the argmax of r over logits in which that token's are -inf (computed here, token by token)
    until then, and ends at its first occurrence after."""
    models, prompt, length, min_tokens = tiny[:n], [5, 17, 99, 3], 24, 8
    free = Engine(models, spec, "ensemble").generate(prompt, SamplingParams(temperature=0, max_new_tokens=length,
                                                                             ignore_eos=True))[0].token_ids
    stop = free[1]
    params = SamplingParams(temperature=0, max_new_tokens=length, ignore_eos=True, stop_token_ids=(stop,),
                            min_tokens=min_tokens)
    for m in models:
        m.runner.truncate([0], [0])
    expected, fed = [], prompt
    for t in range(length):
        logits = [m.runner.forward([0], [fed], [1]) for m in models]
        suppress = torch.zeros_like(logits[0], dtype=torch.bool)
        suppress[:, stop] = t < min_tokens
        expected.append(int(spec.target(logits, 0, 0, 1.0, suppress).argmax()))
        fed = expected[-1:]
        if expected[-1] == stop:
            break
    assert stop not in expected[:min_tokens] and stop in free[:min_tokens]
    for method, gammas in [("ensemble", None), ("ensemble_sd", None), ("se", None), ("se", [3] * n)]:
        got = Engine(models, spec, method, gammas).generate(prompt, params)[0].token_ids
        assert got == expected, (method, gammas)


@pytest.mark.parametrize("spec,n", [GREEDY[0], GREEDY[6]], ids=["weighted", "linear-3"])
def test_greedy_identity_with_the_triton_sampler(tiny, spec, n):
    params = SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True)
    prompt = [5, 17, 99, 3]
    expected = Engine(tiny[:n], spec, "ensemble", sampler="torch").generate(prompt, params)[0].token_ids
    for method, gammas in [("ensemble", None), ("ensemble_sd", None), ("se", [3] * n)]:
        got = Engine(tiny[:n], spec, method, gammas, sampler="triton").generate(prompt, params)[0].token_ids
        assert got == expected, (method, gammas)


@pytest.mark.parametrize("spec,n", [GREEDY[3], GREEDY[5]], ids=["contrastive", "weighted-3"])
def test_triton_sampler_draws_the_same_tokens(tiny, spec, n):
    """Same counter-based randomness on both sides: sampled generations agree token for token."""
    for seed in range(4):
        params = SamplingParams(temperature=0.9, seed=seed, max_new_tokens=24, ignore_eos=True, logprobs=True)
        ref = Engine(tiny[:n], spec, "se", [2] * n, sampler="torch").generate([seed, 8, 1], params)[0]
        got = Engine(tiny[:n], spec, "se", [2] * n, sampler="triton").generate([seed, 8, 1], params)[0]
        assert got.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 3])
def test_se_with_gamma_one_never_uses_more_forwards(tiny, n):
    spec = EnsembleSpec.weighted([1.0] * n)
    for temperature in (0, 1):
        for seed in range(3):
            params = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=40, ignore_eos=True)
            prompt = [seed + 1, 7, 11, 13]
            base = Engine(tiny[:n], spec, "ensemble").generate(prompt, params)[0].metrics
            se = Engine(tiny[:n], spec, "se", [1] * n).generate(prompt, params)[0].metrics
            assert sum(se.forwards) <= sum(base.forwards)
            assert all(a <= b for a, b in zip(se.forwards, base.forwards)), (se.forwards, base.forwards)


# ---------------------------------------------------------------- distribution test

V = 7          # vocabulary of the enumerable models
T = 3          # emitted tokens whose joint law is tested
N = 3000       # samples per configuration
N_TRITON = 1000  # with the Triton sampler, which the interpreter runs at ~0.1 s per sequence
ALPHA = 1e-3   # false-alarm rate of each chi-square test
PROMPT = [1, 4, 2]
BATCH = 32     # sequences decoded together


def enumerable(vocab, names=NAMES[:2]):
    out = []
    for name in names:
        hf = tiny_random_model(name, vocab_size=vocab)
        runner = Transformer.from_hf(hf, max_batch=BATCH, max_len=32, device=DEVICE)  # bf16, the default
        out.append(LoadedModel(name, runner, tiny_tokenizer(), sum(p.numel() for p in hf.parameters())))
    return out


@pytest.fixture(scope="module")
def small():
    return enumerable(V)


def exact_joint(models, spec, params, length=T, prompt=PROMPT):
    """P(x_1..x_length) of the plain ensemble, by enumerating every prefix; params' stop_token_ids
    suppressed at the first params.min_tokens tokens (no stop token may end a sequence earlier)."""
    probs = {}
    vocab = models[0].runner.vocab_size
    assert not params.stop_token_ids or params.min_tokens >= length - 1, "a stop token could end a sequence early"
    for seq in itertools.product(range(vocab), repeat=length):
        p = 1.0
        for t in range(length):
            logits = []
            for m in models:
                m.runner.truncate([0], [0])
                logits.append(m.runner.forward([0], [prompt + list(seq[:t])], [1]))
            suppress = torch.zeros_like(logits[0], dtype=torch.bool)
            if t < params.min_tokens:
                suppress[:, list(params.stop_token_ids)] = True
            p *= float(spec.target(logits, params.temperature, params.top_k, params.top_p, suppress)[0, seq[t]])
        probs[seq] = p
    return probs


def chi_square_pvalue(samples, probs):
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    cells = sorted(probs, key=probs.get, reverse=True)
    stat, df, pooled_e, pooled_o = 0.0, -1, 0.0, 0
    for c in cells:  # cells with expected count < 5 are pooled into one
        e, o = probs[c] * len(samples), counts.get(c, 0)
        if e >= 5:
            stat += (o - e) ** 2 / e
            df += 1
        else:
            pooled_e, pooled_o = pooled_e + e, pooled_o + o
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / max(pooled_e, 1e-12)
        df += 1
    impossible = sum(v for k, v in counts.items() if probs.get(k, 0) == 0)
    return (0.0 if impossible else chi2.sf(stat, df)), stat, df


def draw(models, spec, method, gammas, params, sampler="torch", num=N, drafter=None):
    """num samples of T tokens, one seed each, decoded BATCH sequences at a time."""
    engine = Engine(models, spec, method, gammas, sampler=sampler, drafter=drafter)
    return [tuple(r.token_ids) for r in generations(engine, params, num)]


def generations(engine, params, num, length=T, prompt=PROMPT):
    per_seed = [replace(params, seed=seed, max_new_tokens=length, ignore_eos=True) for seed in range(num)]
    return engine.generate([prompt] * num, per_seed)


SAMPLING = [
    (EnsembleSpec.weighted([0.5, 0.5]), SamplingParams(temperature=1.0)),
    (EnsembleSpec.weighted([0.3, 0.7]), SamplingParams(temperature=0.8, top_k=5, top_p=0.8)),
    (EnsembleSpec.contrastive(0.3), SamplingParams(temperature=1.0, top_p=0.9)),
]


@pytest.mark.parametrize("spec,params", SAMPLING, ids=["weighted", "weighted-topk-topp", "contrastive-topp"])
@pytest.mark.parametrize("method,gammas", [("se", [2, 1]), ("se", [1, 2]), ("ensemble_sd", [2, 1])])
def test_sampled_tokens_follow_the_ensemble(small, spec, params, method, gammas):
    probs = exact_joint(small, spec, params)
    pvalue, stat, df = chi_square_pvalue(draw(small, spec, method, gammas, params), probs)
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


@pytest.mark.parametrize("spec,params", SAMPLING[1:], ids=["weighted-topk-topp", "contrastive-topp"])
def test_sampled_tokens_follow_the_ensemble_with_auto_gammas(small, spec, params):
    """Draft lengths chosen per proposal from each sequence's acceptance so far."""
    auto = AutoGammas([ForwardCost(0.01, 0.001), ForwardCost(0.1, 0.004)], max_gamma=3)
    probs = exact_joint(small, spec, params)
    pvalue, stat, df = chi_square_pvalue(draw(small, spec, "se", auto, params), probs)
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


@pytest.mark.parametrize("method", ["se", "ensemble_sd"])
def test_sampled_tokens_follow_the_ensemble_with_a_confidence_threshold(method):
    """4 tokens over a vocabulary of 5 (625 cells, the mass on fewer); proposals of up to 3 drafts that end after an
    unsure draft. A sequence's first proposal (3 tokens left) ends after its first draft, or after
    its second, whose confidence depends on the first, still unverified draft, or runs full."""
    models, length, prompt = enumerable(5), 4, [1, 3, 2]
    spec, params = SAMPLING[0]
    # The top probabilities of these models: quartiles about 0.7, 0.85, 0.96.
    engine = Engine(models, spec, method, [3, 3], sampler="torch", confidence_threshold=0.8)
    results = generations(engine, params, N, length, prompt)
    firsts = [r.metrics.draft_lengths[0][1] for r in results]
    assert all(firsts.count(g) > 0.02 * N for g in (1, 2, 3)), [firsts.count(g) for g in (1, 2, 3)]
    probs = exact_joint(models, spec, params, length, prompt)
    pvalue, stat, df = chi_square_pvalue([tuple(r.token_ids) for r in results], probs)
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_distribution_test_catches_a_stop_that_peeks_at_the_coin(monkeypatch):
    """Planted bug: a proposal ends where the acceptance coin of the next position is high, a rule
    that reads the verification's randomness instead of the proposer's logits."""
    def peeking(self, q, seqs):
        seeds = torch.tensor([s.seed for s in seqs], device=q.device)
        positions = torch.tensor([s.frontier + 1 for s in seqs], device=q.device)
        return uniform(seeds, positions, STREAM_ACCEPT) > 0.7

    monkeypatch.setattr(Scheduler, "_unsure", peeking)
    models, prompt = enumerable(5), [1, 3, 2]
    spec, params = SAMPLING[0]
    engine = Engine(models, spec, "se", [3, 3], sampler="torch", confidence_threshold=0.8)
    samples = [tuple(r.token_ids) for r in generations(engine, params, N, 4, prompt)]
    pvalue, stat, df = chi_square_pvalue(samples, exact_joint(models, spec, params, 4, prompt))
    assert pvalue < ALPHA, f"planted bug not detected: chi2={stat:.1f} df={df} p={pvalue:.2e}"


def min_tokens_case(models, spec):
    """params with min_tokens 2 of 3 whose stop token is the ensemble's most likely first token."""
    params = SamplingParams(temperature=1.0)
    first = exact_joint(models, spec, params, length=1)
    stop = max(first, key=first.get)[0]
    return replace(params, stop_token_ids=(stop,), min_tokens=T - 1)


@pytest.mark.parametrize("spec", [SAMPLING[0][0], SAMPLING[2][0]], ids=["weighted", "contrastive"])
@pytest.mark.parametrize("method,gammas", [("ensemble", None), ("se", [2, 1]), ("ensemble_sd", [2, 1])])
def test_sampled_tokens_follow_the_ensemble_with_min_tokens(small, spec, method, gammas):
    """The stop token, suppressed at the first two tokens (its logit -inf where the filters act),
    may end a sequence only at the third."""
    params = min_tokens_case(small, spec)
    samples = draw(small, spec, method, gammas, params)
    assert all(params.stop_token_ids[0] not in s[:T - 1] for s in samples)
    pvalue, stat, df = chi_square_pvalue(samples, exact_joint(small, spec, params))
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_distribution_test_catches_min_tokens_left_out_of_verify(small, monkeypatch):
    """Planted bug: the ensemble draws suppress the stop tokens but the acceptance test does not."""
    real = verify_module.verify_reference
    monkeypatch.setattr(verify_module, "verify_reference", lambda *args: real(*args[:-1]))  # suppress: last
    spec = SAMPLING[0][0]
    params = min_tokens_case(small, spec)
    samples = draw(small, spec, "se", [2, 1], params)
    pvalue, stat, df = chi_square_pvalue(samples, exact_joint(small, spec, params))
    assert pvalue < ALPHA, f"planted bug not detected: chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_sampled_tokens_follow_the_ensemble_with_the_triton_sampler(small):
    spec, params = SAMPLING[0]
    samples = draw(small, spec, "se", [2, 1], params, sampler="triton", num=N_TRITON)
    pvalue, stat, df = chi_square_pvalue(samples, exact_joint(small, spec, params))
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_distribution_test_catches_an_unverified_bonus(small, monkeypatch):
    """Planted bug (the one of ensemble-weighted assisted generation): the scorer's own sample at
    the extra position is emitted directly instead of opening a proposal that is verified."""
    real_after_score = Scheduler._after_score

    def emit_bonus(self, s, rejected):
        real_after_score(self, s, rejected)
        if not rejected and not s.pending:
            (m,) = s.action.models
            tokens, _ = self._draw([m], EnsembleSpec.weighted([1.0]), STREAM_DRAFT + m, [s])
            self._commit(s, tokens)
            if not s.finished:
                self._start_proposal(s, m)

    monkeypatch.setattr(Scheduler, "_after_score", emit_bonus)
    spec, params = SAMPLING[0]
    pvalue, stat, df = chi_square_pvalue(draw(small, spec, "se", [1, 1], params), exact_joint(small, spec, params))
    assert pvalue < ALPHA, f"planted bug not detected: chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_distribution_test_catches_q_before_top_p(small, monkeypatch):
    """Planted bug: the acceptance test uses the proposer's distribution before top-p filtering."""
    real = verify_module.process_logits
    monkeypatch.setattr(verify_module, "process_logits", lambda x, t, k, p: real(x, t, k, 1.0))
    spec, params = SAMPLING[2]
    pvalue, stat, df = chi_square_pvalue(draw(small, spec, "se", [2, 1], params), exact_joint(small, spec, params))
    assert pvalue < ALPHA, f"planted bug not detected: chi2={stat:.1f} df={df} p={pvalue:.2e}"
