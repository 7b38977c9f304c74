"""Validate, then load: every Engine argument is checked before any model loads and every request
at submit, each error naming its field; a refused request leaves the engine serving the others."""

import math

import pytest
import torch

import se_engine.engine as engine_module
from se_engine import UnknownModelError
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.gamma import AutoGammas, ForwardCost
from se_engine.sampling import FP32_TINY, SamplingParams

NAMES = ["tiny-random-llama", "tiny-random-qwen2"]
CUSTOM = EnsembleSpec.custom(lambda logits: logits[0] + logits[1], 2)
GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tiny_models):
    return tiny_models(NAMES, dtype=torch.float32, max_len=96)


@pytest.fixture(scope="module")
def engine(pair):
    return Engine(pair, None, "se", [3, 1])


def finish(engine: Engine) -> dict:
    """Drives the engine until every request has finished: request id -> GenerationResult."""
    results = {}
    while engine.has_unfinished():
        results.update((out.request_id, out.result) for out in engine.step() if out.result is not None)
    return results


@pytest.mark.parametrize("field,value", [
    ("temperature", True), ("temperature", "1"), ("temperature", -1.0), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", 1e39),  # inf in float32
    ("temperature", FP32_TINY / 2), ("temperature", 1e-40), ("temperature", 5e-324),  # subnormal or 0 in float32
    ("top_p", True), ("top_p", 0.0), ("top_p", 1e-40), ("top_p", FP32_TINY / 2), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", True), ("top_k", 1.0), ("top_k", -1),
    ("seed", True), ("seed", 1.0), ("seed", -1), ("seed", 2**63),
    ("max_new_tokens", True), ("max_new_tokens", 2.0), ("max_new_tokens", 0),
    ("stop_token_ids", [1.7]), ("stop_token_ids", [-5]), ("stop_token_ids", ["a"]), ("stop_token_ids", [True]),
    ("stop_token_ids", 3), ("stop_token_ids", None),
    ("stop", None), ("stop", [""]), ("stop", [1]),
    ("ignore_eos", 1), ("logprobs", "yes"),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_sampling_params_edges_and_normal_forms():
    assert SamplingParams(temperature=FP32_TINY, top_p=FP32_TINY).top_p == FP32_TINY  # the smallest normal is fine
    assert SamplingParams(temperature=0, top_p=1).greedy
    assert SamplingParams(stop_token_ids=[3, 5]).stop_token_ids == (3, 5)
    assert SamplingParams(stop_token_ids={7}).stop_token_ids == (7,)
    assert SamplingParams(stop="\n").stop == ("\n",)


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the arguments were checked")

    monkeypatch.setattr(engine_module, "load_model", refuse)


def test_the_loading_guard_catches_a_load(no_loading):
    """Good arguments do reach load_model: the guard below proves each refusal came before it."""
    with pytest.raises(AssertionError, match="a model loaded"):
        Engine(NAMES, None, "se", [4, 1], proposer_order=[0, 1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(gammas=[1000, 1]), r"^gammas must be ints in \[1, 16\], got \[1000, 1\]"),
    (dict(gammas=[17, 1]), r"^gammas must be ints in \[1, 16\]"),
    (dict(gammas=[0, 1]), r"^gammas must be ints in \[1, 16\]"),
    (dict(gammas=[True, 1]), r"^gammas must be ints in \[1, 16\]"),
    (dict(gammas=[1]), r"^gammas must be 'auto', an AutoGammas or 2 draft lengths \(one per model\), got \[1\]"),
    (dict(gammas="fast"), "^gammas must be 'auto', an AutoGammas or 2 draft lengths"),
    (dict(gammas=AutoGammas([ForwardCost(0.01, 0.001)] * 3)), "^AutoGammas has costs for 3 models, the engine runs 2"),
    (dict(proposer_order=[0, 0]), r"^proposer_order must be a permutation of 0..1, got \[0, 0\]"),
    (dict(proposer_order=[True, False]), "^proposer_order must be a permutation"),
    (dict(proposer_order=[0, 1, 2]), "^proposer_order must be a permutation"),
    (dict(proposer_order=1), "^proposer_order must be a permutation"),
    (dict(ensemble=CUSTOM, sampler="triton"), "^sampler='triton' cannot run this ensemble: custom ensembles"),
    (dict(models=NAMES[:1] * 5, sampler="triton"), "^sampler='triton' cannot run this ensemble: .* at most 4 models"),
    (dict(method="ensemble_sd", targets={"x": ([0, 1], CUSTOM)}, sampler="triton"),
     "^sampler='triton' cannot run target 'x': custom ensembles"),
    (dict(method="ensemble_sd", targets={"x": ([0], None)}, proposer_order=[0, 1]),
     r"^target 'x' is the proposer \(model 0\) alone"),
    (dict(method="ensemble_sd", targets={"x": ([True], None)}), "^target 'x': model indices must be distinct ints"),
    (dict(sampler="cuda"), "^sampler must be one of"),
    (dict(method="speculative"), "^method must be one of"),
    (dict(method="single"), "^method 'single' runs one model, got 2"),
    (dict(models="tiny-random-llama"), "^models must be a non-empty sequence"),
    (dict(models=[]), "^models must be a non-empty sequence"),
    (dict(models=[NAMES[0], 5]), "^models must be names / paths"),
    (dict(max_batch=True), "^max_batch must be None or an int >= 1"),
    (dict(max_batch=0), "^max_batch must be None or an int >= 1"),
    (dict(confidence_threshold=True), r"^confidence_threshold must be a number in \[0, 1\]"),
    (dict(confidence_threshold=1.5), r"^confidence_threshold must be a number in \[0, 1\]"),
    (dict(max_len=0), "^max_len must be an int >= 1"),
    (dict(max_len=64.0), "^max_len must be an int >= 1"),
    (dict(runner="vllm"), "^runner must be 'native' or 'hf'"),
    (dict(runner="hf", max_batch=4), "^runner='hf' serves batch 1 only, got max_batch=4"),
    (dict(dtype="float32"), "^dtype must be None or a torch.dtype"),
    (dict(device="gpu"), "^device must be a torch device"),
    (dict(cuda_graphs="yes"), "^cuda_graphs must be None, True or False"),
    (dict(prefix_cache=1), "^prefix_cache must be True or False"),
    (dict(cuda_graphs=True), "^cuda_graphs=True needs native models on a CUDA device"),
    (dict(drafter=object()), "^a drafter proposes for method 'ensemble_sd'"),
    (dict(method="ensemble_sd", drafter=object()), "^drafter must be a runner"),
])
def test_engine_arguments_are_checked_before_any_model_loads(no_loading, kwargs, match):
    kwargs = {"models": NAMES, **kwargs}
    with pytest.raises(ValueError, match=match):
        Engine(**kwargs)


def test_an_unknown_model_is_refused_before_the_others_load(no_loading):
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-17'"):
        Engine([NAMES[0], "gpt-17"])


@pytest.mark.parametrize("prompt,params,match", [
    (None, None, "^prompt must be a str or a sequence of token ids, got None"),
    (7, None, "^prompt must be a str or a sequence of token ids, got 7"),
    ([1, True], None, r"^prompt token ids must be ints in \[0, \d+\), got True"),
    ([1, 2.0], None, r"^prompt token ids must be ints in \[0, \d+\), got 2.0"),
    ([1, -1], None, r"^prompt token ids must be ints in \[0, \d+\), got -1"),
    ([1, 10**6], None, r"^prompt token ids must be ints in \[0, \d+\), got 1000000"),
    ([], None, "^prompt is empty"),
    ([1, 2], SamplingParams(stop_token_ids=[5, 10**6]), r"^stop_token_ids must be in \[0, \d+\), got \[1000000\]"),
    ([1, 2], {"temperature": 0}, "^params must be a SamplingParams or None"),
    ([1] * 90, SamplingParams(max_new_tokens=10), "max_new_tokens=10 .* exceeds max_len=96"),
])
def test_bad_requests_are_refused_at_submit(engine, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, params)
    assert not engine.has_unfinished()


def test_generate_refuses_a_missing_prompt(engine):
    with pytest.raises(ValueError, match="^prompt must be a str or a sequence of token ids, got None"):
        engine.generate(None, GREEDY)


def test_the_engine_serves_on_after_refused_requests(engine):
    expected = engine.generate([1, 2, 3], GREEDY)[0].token_ids
    valid = engine.submit([1, 2, 3], GREEDY)
    for prompt, params in [(None, GREEDY), ([1, True], GREEDY), ([1, 2], SamplingParams(stop_token_ids=[10**6])),
                           ([1] * 95, GREEDY)]:
        with pytest.raises(ValueError):
            engine.submit(prompt, params)
    results = finish(engine)
    assert list(results) == [valid] and results[valid].token_ids == expected


def test_the_triton_sampler_refuses_filtered_requests_at_submit(pair):
    """The fused kernels serve no top-k / top-p: such a request once passed submit and failed the next
    tick, leaving the valid request of the same batch stuck."""
    engine = Engine(pair, None, "se", [2, 1], sampler="triton")
    assert engine.scheduler.sampler == "triton"
    valid = engine.submit([1, 2, 3], GREEDY)
    for params in (SamplingParams(top_k=5, max_new_tokens=8), SamplingParams(top_p=0.9, max_new_tokens=8)):
        with pytest.raises(ValueError, match="^sampler='triton' cannot serve this request: top_k / top_p run in "
                                             "PyTorch, got top_k="):
            engine.submit([4, 5], params)
    results = finish(engine)
    expected = Engine(pair, None, "se", [2, 1], sampler="torch").generate([1, 2, 3], GREEDY)[0].token_ids
    assert list(results) == [valid] and results[valid].token_ids == expected
