"""Native runner vs transformers, incremental vs full forwards, rollback, bad inputs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from se_engine import CacheOverflowError, load_model, resolve
from se_engine.hf_runner import HFRunner
from se_engine.model import Transformer
from se_engine.sources import TINY_VOCAB

TINY = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-qwen2-deep"]


def hf_model(name, dtype):
    return AutoModelForCausalLM.from_pretrained(resolve(name, dtype), dtype=dtype).eval()


@pytest.mark.parametrize("name", TINY)
def test_native_matches_transformers_fp32(name):
    hf = hf_model(name, torch.float32)
    native = Transformer.from_hf(hf, max_batch=3, max_len=64, dtype=torch.float32)
    tokens = torch.randint(0, TINY_VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    out = native.forward(tokens)
    assert out.shape == (3, 17, TINY_VOCAB) and out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert err < 1e-4, f"max abs error {err}"  # measured: ~5e-6
    assert torch.equal(native.lengths, torch.full((3,), 17))


@pytest.mark.parametrize("name", TINY)
def test_native_bf16_as_accurate_as_transformers_bf16(name):
    """bf16 results differ by rounding order, so both are held against the fp32 forward:
    the native runner's error must not exceed transformers' own bf16 error by more than 25%."""
    tokens = torch.randint(0, TINY_VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = hf_model(name, torch.float32)(tokens).logits
        hf16 = hf_model(name, torch.bfloat16)
        hf_err = (hf16(tokens).logits.float() - exact).abs().mean().item()
    native = Transformer.from_hf(hf16, max_batch=3, max_len=64, dtype=torch.bfloat16)
    native_err = (native.forward(tokens) - exact).abs().mean().item()
    assert native_err <= 1.25 * hf_err, f"native bf16 mean error {native_err}, transformers {hf_err}"


def full_logits(hf, seq):
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2"])
def test_incremental_equals_full_ragged(name):
    """Ragged prefill (padded), decode steps, a k-token verify, ragged truncate, re-decode:
    each forward's logits equal a fresh full forward of the row's committed tokens."""
    hf = hf_model(name, torch.float32)
    runner = Transformer.from_hf(hf, max_batch=3, max_len=48, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    prompt_lens = [5, 11, 8]
    seqs = [torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist() for n in prompt_lens]
    k = max(prompt_lens)
    padded = torch.tensor([s + [0] * (k - len(s)) for s in seqs])
    last = runner.forward(padded, num_tokens=torch.tensor(prompt_lens), last_only=True)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(last[b, 0], full_logits(hf, s)[-1], atol=1e-4, rtol=0)
    assert runner.lengths.tolist() == prompt_lens

    def step(new_tokens):  # new_tokens: [3][k]
        out = runner.forward(torch.tensor(new_tokens))
        for b, s in enumerate(seqs):
            s.extend(new_tokens[b])
            ref = full_logits(hf, s)[-len(new_tokens[b]):]
            torch.testing.assert_close(out[b], ref, atol=1e-4, rtol=0)

    for _ in range(3):
        step(torch.randint(0, TINY_VOCAB, (3, 1), generator=gen).tolist())
    step(torch.randint(0, TINY_VOCAB, (3, 4), generator=gen).tolist())  # verification of 4 drafts
    keep = [2, 0, 4]
    for b, s in enumerate(seqs):
        del s[len(s) - 4 + keep[b]:]
    runner.truncate(torch.tensor([len(s) for s in seqs]))
    for _ in range(2):
        step(torch.randint(0, TINY_VOCAB, (3, 2), generator=gen).tolist())
    step(torch.randint(0, TINY_VOCAB, (3, 1), generator=gen).tolist())


def test_truncate_is_metadata_only():
    hf = hf_model("tiny-random-llama", torch.float32)
    runner = Transformer.from_hf(hf, max_batch=2, max_len=16, dtype=torch.float32)
    runner.forward(torch.randint(0, TINY_VOCAB, (2, 6)))
    k_ptr, before = runner.k_cache.data_ptr(), runner.k_cache.clone()
    runner.truncate(torch.tensor([3, 5]))
    assert runner.k_cache.data_ptr() == k_ptr and torch.equal(runner.k_cache, before)
    assert runner.lengths.tolist() == [3, 5]
    with pytest.raises(ValueError, match="only shorten"):
        runner.truncate(torch.tensor([4, 5]))


def test_hf_runner_incremental_equals_full():
    hf = hf_model("tiny-random-qwen2", torch.float32)
    runner = HFRunner(hf, max_len=32)
    seq = torch.randint(0, TINY_VOCAB, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    runner.forward(torch.tensor([seq[:6]]))
    out = runner.forward(torch.tensor([seq[6:9]]))
    torch.testing.assert_close(out[0], full_logits(hf, seq)[6:9], atol=1e-4, rtol=0)
    runner.truncate(torch.tensor([7]))
    out = runner.forward(torch.tensor([[seq[7]]]))
    torch.testing.assert_close(out[0, 0], full_logits(hf, seq[:8])[-1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="batch 1"):
        runner.forward(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(CacheOverflowError):
        runner.forward(torch.zeros(1, 30, dtype=torch.long))


def test_overflow_is_a_clear_error():
    m = load_model("tiny-random-llama", dtype=torch.float32, max_batch=1, max_len=12)
    with pytest.raises(CacheOverflowError, match="max_len=12"):
        m.runner.forward(torch.zeros(1, 13, dtype=torch.long))  # prompt longer than the cache
    m.runner.forward(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(CacheOverflowError, match="holds 10 of max_len=12"):
        m.runner.forward(torch.zeros(1, 3, dtype=torch.long))  # a verify that overflows
    m.runner.forward(torch.zeros(1, 2, dtype=torch.long))  # exactly full is fine
    assert m.runner.lengths.tolist() == [12]


def test_batch_mismatch_is_a_clear_error():
    m = load_model("tiny-random-llama", dtype=torch.float32, max_batch=2, max_len=12)
    with pytest.raises(ValueError, match="max_batch=2"):
        m.runner.forward(torch.zeros(3, 1, dtype=torch.long))
