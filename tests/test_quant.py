"""Quantized drafters: each layer against its dequantized weight (both of its paths), quantized models
against the model, exactness of decoding with a quantized drafter, bad input."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from test_exactness import ALPHA, SAMPLING, chi_square_pvalue, draw, exact_joint, small  # noqa: F401 (fixture)

from se_engine import load_model
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.quant import GROUP, INT4_KERNEL_ROWS, INT8_KERNEL_ROWS, LAYERS, Int4Linear, quantize
from se_engine.sampling import SamplingParams

NAMES = ["tiny-random-llama", "tiny-random-qwen2"]
SCHEMES = list(LAYERS)
KERNELS = ("aten::_weight_int8pack_mm", "se_q::int4_linear")


def kernel_calls(layer: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.profiler.profile() as prof:
        layer(x)
    return sum(e.count for e in prof.key_averages() if e.key in KERNELS)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features,bias", [(37, 64, True), (160, 96, False), (5, 160, True)])
def test_layer_applies_its_dequantized_weight(scheme, dtype, out_features, in_features, bias):
    """Row counts on both sides of the kernel's limit (the kernel up to it, the dequantized matmul
    beyond; int4's kernel takes bf16 only; in_features 96 and 160 end in a partial block of int4's
    codes) compute x W~^T + b, and W~ is within half a quantization step of W (a little more in bf16,
    whose scales are rounded)."""
    gen = torch.Generator().manual_seed(out_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * torch.rand(out_features, 1, generator=gen))
        linear.weight[0, 0] = 4.0  # an outlier
    layer = LAYERS[scheme](linear)
    w = linear.weight.detach().float()
    if scheme == "int8":
        step = layer.scales.float()[:, None]
    else:
        group = w.view(out_features, -1, GROUP)
        step = ((group.amax(-1) - group.amin(-1)) / 15).repeat_interleave(GROUP, dim=1)
    slack = 0.5 + (1e-3 if dtype == torch.float32 else 0.05)
    assert ((layer.dequantized() - w).abs() <= slack * step).all()
    limit = INT8_KERNEL_ROWS if scheme == "int8" else INT4_KERNEL_ROWS
    for rows in (1, 2, limit, limit + 1, 13):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        expected = x.float() @ layer.dequantized().T + (linear.bias.detach().float() if bias else 0)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(layer(x).float(), expected, atol=tol * expected.abs().max(), rtol=0)
        assert layer(x[None]).shape == (1, rows, out_features)
        assert kernel_calls(layer, x) == (rows <= limit and (scheme == "int8" or dtype == torch.bfloat16))


INT4_CHECK = """
import torch
from se_engine.quant import Int4Linear
g = torch.Generator().manual_seed(0)
for out_features, in_features, bias in [(37, 96, True), (5, 160, False), (64, 256, True), (9, 32, False)]:
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
    layer = Int4Linear(linear)
    w = layer.dequantized()
    dequantized = torch.ops.se_q.int4_dequantize(layer.packed, layer.scale_zero, in_features).float()
    assert ((dequantized - w).abs() <= 2 ** -8 * w.abs() + 1e-6).all()
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, in_features, generator=g).bfloat16()
        expected = x.float() @ w.T + (linear.bias.float() if bias else 0)
        y = torch.ops.se_q.int4_linear(x, layer.packed, layer.scale_zero, layer.bias).float()
        assert (y - expected).abs().max() <= 2e-2 * expected.abs().max(), (out_features, in_features, rows)
print("ok")
"""


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "portable"])
def test_int4_kernels_apply_the_dequantized_weight(portable):
    """se_q's ops on both paths (SE_ENGINE_PORTABLE_KERNELS forces the loops of CPUs without
    AVX512-VNNI / BF16): partial blocks, tails of the row and output tiles, biases."""
    env = dict(os.environ, **({"SE_ENGINE_PORTABLE_KERNELS": "1"} if portable else {}))
    done = subprocess.run([sys.executable, "-c", INT4_CHECK], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_int4_needs_whole_groups():
    with pytest.raises(ValueError, match="in_features divisible by 32"):
        Int4Linear(torch.nn.Linear(40, 16))


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models(NAMES, max_batch=3, max_len=160)


@pytest.fixture(scope="module")
def drafters(tiny_models):
    """Quantized copies of the qwen2 model (the expert of the contrastive ensemble below)."""
    return {s: tiny_models(NAMES[1:2], max_batch=3, max_len=160, quantize=s)[0].runner for s in SCHEMES}


@pytest.mark.parametrize("scheme,max_tv", [("int8", 0.03), ("int4", 0.25)])
def test_quantized_model_is_close_to_the_model(tiny, drafters, scheme, max_tv):
    """Mean total variation to the model over a prompt (the wide-init tiny models have peaked,
    quantization-sensitive logits)."""
    drafter = drafters[scheme]
    assert isinstance(drafter.output, LAYERS[scheme]) and isinstance(drafter.layers[0].feed_forward.w2, LAYERS[scheme])
    model, prompt = tiny[1].runner, [[3, 77, 200, 9, 41, 5, 18, 250]]
    for m in (model, drafter):
        m.truncate([0], [0])
    ref, out = model.forward([0], prompt, [8]), drafter.forward([0], prompt, [8])
    assert not torch.equal(ref, out)
    tv = 0.5 * (ref.softmax(-1) - out.softmax(-1)).abs().sum(-1)
    assert tv.mean() < max_tv, tv
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() >= 0.6


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("spec,order", [(EnsembleSpec.weighted([0.5, 0.5]), [0, 1]),
                                        (EnsembleSpec.contrastive(0.1), [1, 0])], ids=["weighted", "contrastive"])
def test_greedy_identity_with_a_quantized_drafter(tiny, drafters, scheme, spec, order):
    check_quantized_drafter([tiny[i] for i in order], spec, drafters[scheme])


def check_quantized_drafter(models, spec, drafter) -> None:
    """A quantized copy of one model drafts for an ensemble it stands beside: the batched output is
    the plain ensemble's, token for token, and some drafts are accepted (the acceptance path runs)."""
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    prompts = [[5, 17, 99, 3], [200, 1], list(range(30, 50))]
    expected = [r.token_ids for r in Engine(models, spec, "ensemble").generate(prompts, params)]
    engine = Engine(models, spec, "ensemble_sd", [1, 1, 4], drafter=drafter)
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == expected
    accepted, tested = (sum(getattr(r.metrics, k)[2] for r in results) for k in ("drafts_accepted", "drafts_tested"))
    assert tested > 0 and accepted > 0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", [0, 2], ids=["weighted", "contrastive-topp"])
def test_sampled_tokens_follow_the_ensemble_with_a_quantized_drafter(small, scheme, case):
    """The enumerable models of test_exactness (vocabulary 7: a tail of int4's output tiles): a quantized
    copy of model 0 drafts; the law of the emitted tokens is the ensemble's (chi-square against the
    exact joint)."""
    spec, params = SAMPLING[case]
    draft = quantize(copy.deepcopy(small[0].runner), scheme)
    samples = draw(small, spec, "ensemble_sd", [1, 1, 2], params, drafter=draft)
    pvalue, stat, df = chi_square_pvalue(samples, exact_joint(small, spec, params))
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


def test_bad_input():
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        load_model(NAMES[0], quantize="int2")
    with pytest.raises(ValueError, match="needs runner='native'"):
        load_model(NAMES[0], runner="hf", quantize="int8")
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize(load_model(NAMES[0]).runner, "fp8")
