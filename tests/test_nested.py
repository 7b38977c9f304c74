"""Nested early-exit drafter: exit-depth logits and deferred KV against the full model, exactness of
decoding with it (greedy identity and the distribution of sampled tokens), planted bugs, bad input."""

import math
import random

import pytest
import torch
from test_exactness import ALPHA, SAMPLING, chi_square_pvalue, draw, exact_joint, small  # noqa: F401 (fixture)

from se_engine import VocabularyMismatchError
from se_engine.decode import Scheduler
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.model import Transformer
from se_engine.nested import NestedDrafter
from se_engine.packing import PackedBatch
from se_engine.sampling import SamplingParams

NAMES = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-qwen2-deep"]
SLOTS = 3  # drafter slots; the model's slot SLOTS is the reference's scratch slot


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(NAMES, max_batch=SLOTS + 1, max_len=160)


@torch.inference_mode()
def reference(model: Transformer, seq: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The full model over seq in its scratch slot: the head's logits after each layer (L x [len, V])
    and every layer's K and V ([L, Hkv, len, D] each)."""
    batch = PackedBatch.build([SLOTS], [0], [len(seq)], [len(seq)], seq, model.device, model.invariant)
    x, logits = model.embed(batch.tokens), []
    for layer in range(model.cfg.num_layers):
        x = model.run_layers(x, batch, range(layer, layer + 1), model.k_cache, model.v_cache)
        logits.append(model.head(x))
    return logits, model.k_cache[:, SLOTS, :, :len(seq)].clone(), model.v_cache[:, SLOTS, :, :len(seq)].clone()


def check_against_full_model(model: Transformer, drafter: NestedDrafter, seed: int, steps: int = 40) -> int:
    """Random ragged forwards over the drafter's slots (mostly one logit per row, as in drafting; some
    rows with several or none), rollbacks and forks. Every returned logit must be the full model's
    at the depth the exit rule picks, and every KV entry the drafter holds the full model's, bit for
    bit (bf16 through the batch-invariant kernels).
    Returns how many forwards caught deferred tokens up."""
    rng = random.Random(seed)
    seqs: dict[int, list[int]] = {s: [] for s in range(SLOTS)}
    depths, last = drafter.depths, len(drafter.depths) - 1
    catch_ups = 0
    for step in range(steps):
        rows = rng.sample(range(SLOTS), rng.randint(1, SLOTS))
        feeds = [[rng.randrange(model.vocab_size) for _ in range(rng.randint(1, 4))] for _ in rows]
        num = [rng.randint(0, len(f)) if rng.random() < 0.2 else 1 for f in feeds]
        before = [[f[r] for f in drafter.filled] for r in rows]
        out, at = drafter.forward(rows, feeds, num), 0
        for r, feed, n, filled in zip(rows, feeds, num, before):
            seqs[r] += feed
            logits, _, _ = reference(model, seqs[r])
            tops = [float(logits[d - 1][-1].softmax(-1).max()) for d in depths]
            exit_at = 0 if not n else next((i for i in range(last) if tops[i] >= drafter.thresholds[i]), last)
            assert torch.equal(out[at:at + n], logits[depths[exit_at] - 1][len(seqs[r]) - n:]), "logits differ"
            catch_ups += drafter.filled[exit_at][r] - filled[exit_at] > len(feed)
            at += n
        if rng.random() < 0.3:
            r = rng.randrange(SLOTS)
            seqs[r] = seqs[r][:rng.randint(0, len(seqs[r]))]
            drafter.truncate([r], [len(seqs[r])])
        if rng.random() < 0.15:
            src, dst = rng.sample(range(SLOTS), 2)
            drafter.fork(src, [dst])
            seqs[dst] = list(seqs[src])
        for s, seq in seqs.items():
            assert drafter.lengths[s] == len(seq)
            if not seq:
                continue
            _, k, v = reference(model, seq)
            for i, d in enumerate(depths):
                layers, n = slice(depths[i - 1] if i else 0, d), drafter.filled[i][s]
                assert torch.equal(drafter.k_cache[layers, s, :, :n], k[layers, :, :n]), "KV entries differ"
                assert torch.equal(drafter.v_cache[layers, s, :, :n], v[layers, :, :n]), "KV entries differ"
    return catch_ups


VIEWS = [([1, 2, 3, 4], [0.6, 0.6, 0.6]), ([2, 3], [0.7]), ([4], [])]


@pytest.mark.parametrize("depths,thresholds", VIEWS, ids=["1-2-3-4", "2-3", "full"])
def test_exit_depth_logits_and_kv_equal_the_full_model(tiny, depths, thresholds):
    model = tiny[2].runner
    drafter = NestedDrafter(model, depths, thresholds, max_batch=SLOTS)
    catch_ups = check_against_full_model(model, drafter, seed=len(depths))
    if len(depths) > 1:
        assert catch_ups > 0 and all(drafter.exits), (catch_ups, drafter.exits)


@pytest.mark.parametrize("name", ["tiny-random-qwen3", "tiny-random-llama3", "tiny-random-phi4"])
def test_exit_depths_of_other_families(tiny_models, name):
    """Qwen3's q/k norms, Llama 3's scaled RoPE and Phi-4-mini's partial longrope in the early-exit
    views, bit for bit."""
    (loaded,) = tiny_models([name], max_batch=SLOTS + 1, max_len=160)
    drafter = NestedDrafter(loaded.runner, [1, 2], [0.6], max_batch=SLOTS)
    assert check_against_full_model(loaded.runner, drafter, seed=7) > 0 and all(drafter.exits), drafter.exits


def test_skipping_the_catch_up_is_detected(tiny, monkeypatch):
    """Planted bug: deferred tokens are marked as having every layer's KV, so deeper layers never
    compute theirs. The comparison with the full model must fail."""
    real_forward = NestedDrafter.forward

    def no_catch_up(self, rows, tokens, num_logits):
        out = real_forward(self, rows, tokens, num_logits)
        for filled in self.filled:
            for r in rows:
                filled[r] = self.lengths[r]
        return out

    monkeypatch.setattr(NestedDrafter, "forward", no_catch_up)
    model = tiny[2].runner
    with pytest.raises(AssertionError, match="differ"):
        check_against_full_model(model, NestedDrafter(model, *VIEWS[0], max_batch=SLOTS), seed=4)


# ---------------------------------------------------------------- decoding with a drafter

TARGETS = {  # members (indices into NAMES), ensemble, the plain method with the same output
    "self": ([2], None, "single"),
    "weighted": ([0, 2], EnsembleSpec.weighted([0.5, 0.5]), "ensemble"),
    "contrastive": ([2, 0], EnsembleSpec.contrastive(0.1), "ensemble"),
}
THRESHOLDS = [0.0, 0.5, 0.8, 1.01]  # always the first depth .. never before the last


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_greedy_identity_with_a_nested_drafter(tiny, target, threshold):
    """A nested view of the deep model (depths 1, 2, 4) drafts for itself or for an ensemble it
    belongs to: the batched output is the plain method's, token for token."""
    members, spec, plain = TARGETS[target]
    models = [tiny[i] for i in members]
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    prompts = [[5, 17, 99, 3], [200, 1], [5, 17, 99, 3], list(range(30, 50))]
    expected = [r.token_ids for r in Engine(models, spec, plain).generate(prompts, params)]
    exits = []
    for gamma in (2, 4):
        drafter = NestedDrafter(tiny[2].runner, [1, 2, 4], [threshold, threshold])
        engine = Engine(models, spec, "ensemble_sd", [1] * len(models) + [gamma], drafter=drafter)
        assert [r.token_ids for r in engine.generate(prompts, params)] == expected, gamma
        exits.append(drafter.exits)
    used = [sum(e[i] for e in exits) > 0 for i in range(3)]
    assert used == {0.0: [True, False, False], 1.01: [False, False, True]}.get(threshold, [True] * 3), exits


def test_sampled_tokens_with_the_triton_sampler_and_a_drafter(tiny):
    """The fused kernels take the drafter as a zero-weight model: the same tokens as PyTorch."""
    spec, (members, _, _) = EnsembleSpec.weighted([0.5, 0.5]), TARGETS["weighted"]
    models = [tiny[i] for i in members]
    for seed in range(2):
        params = SamplingParams(temperature=0.9, seed=seed, max_new_tokens=16, ignore_eos=True)
        tokens = []
        for sampler in ("torch", "triton"):
            drafter = NestedDrafter(tiny[2].runner, [1, 2, 4], [0.5, 0.5])
            engine = Engine(models, spec, "ensemble_sd", [1, 1, 3], sampler=sampler, drafter=drafter)
            tokens.append(engine.generate([seed, 8, 1], params)[0].token_ids)
        assert tokens[0] == tokens[1]


# Small models (vocabulary 7): self-speculation, and views proposing for the ensembles of
# test_exactness. A threshold of 0.6 mixes the depths there.
DISTRIBUTION = [
    ("self", [1], EnsembleSpec.weighted([1.0]), SAMPLING[0][1], 1, [1, 2, 3]),
    ("self-topk", [0], EnsembleSpec.weighted([1.0]), SamplingParams(temperature=1.2, top_k=4), 0, [1, 2]),
    ("weighted", [0, 1], *SAMPLING[0], 1, [1, 3]),
    ("contrastive-topp", [0, 1], *SAMPLING[2], 0, [1, 2]),
]


def nested_draw(small, members, spec, params, viewed, depths, gamma=2):
    models = [small[i] for i in members]
    drafter = NestedDrafter(small[viewed].runner, depths, [0.6] * (len(depths) - 1))
    samples = draw(models, spec, "ensemble_sd", [1] * len(models) + [gamma], params, drafter=drafter)
    assert sum(e > 0 for e in drafter.exits) >= 2, f"the depths did not mix: {drafter.exits}"
    return samples, exact_joint(models, spec, params)


@pytest.mark.parametrize("case", DISTRIBUTION, ids=[c[0] for c in DISTRIBUTION])
def test_sampled_tokens_follow_the_target_with_a_nested_drafter(small, case):
    _, members, spec, params, viewed, depths = case
    samples, probs = nested_draw(small, members, spec, params, viewed, depths)
    pvalue, stat, df = chi_square_pvalue(samples, probs)
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_distribution_test_catches_full_depth_q(small, monkeypatch):
    """Planted bug: the acceptance test takes q from the full-depth view (the target itself, in
    self-speculation) instead of the depth each draft was drawn from."""
    real_verify = Scheduler._verify

    def full_depth_q(self, scored):
        for s in scored:
            for pos in s.logits[-1]:
                if pos in s.logits[0]:
                    s.logits[-1][pos] = s.logits[0][pos]
        real_verify(self, scored)

    monkeypatch.setattr(Scheduler, "_verify", full_depth_q)
    _, members, spec, params, viewed, depths = DISTRIBUTION[0]
    pvalue, stat, df = chi_square_pvalue(*nested_draw(small, members, spec, params, viewed, depths))
    assert pvalue < ALPHA, f"planted bug not detected: chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_bad_input(tiny, small):
    model = tiny[2].runner
    for depths, thresholds, match in [([], [], "strictly increasing"), ([2, 1], [0.5], "strictly increasing"),
                                      ([0, 2], [0.5], "strictly increasing"), ([1, 5], [0.5], r"in \[1, 4\]"),
                                      ([1, 2], [], "2 depths need 1 thresholds"),
                                      ([1, 2], [-0.1], ">= 0"), ([1, 2], [math.nan], ">= 0")]:
        with pytest.raises(ValueError, match=match):
            NestedDrafter(model, depths, thresholds)
    with pytest.raises(ValueError, match="max_len in"):
        NestedDrafter(model, [1], [], max_len=model.max_len + 1)
    with pytest.raises(TypeError, match="native Transformer"):
        NestedDrafter(object(), [1], [])
    drafter = NestedDrafter(model, [1, 4], [0.5])
    with pytest.raises(ValueError, match="drafter proposes for method 'ensemble_sd'"):
        Engine(tiny[:2], None, "se", drafter=drafter)
    with pytest.raises(ValueError, match="2 draft lengths .one per model, then the drafter"):
        Engine(tiny[2:], None, "ensemble_sd", [4], drafter=drafter)
    with pytest.raises(VocabularyMismatchError, match="the drafter has 7 output logits"):
        Engine(tiny[2:], None, "ensemble_sd", drafter=NestedDrafter(small[1].runner, [1, 3], [0.5]))
    with pytest.raises(ValueError, match="rows must be distinct"):
        drafter.forward([0, 0], [[1], [2]], [1, 1])
    with pytest.raises(ValueError, match="truncate can only shorten"):
        drafter.truncate([0], [1])
