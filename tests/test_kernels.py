"""The fused Triton kernels against their PyTorch twins: compiled on a GPU, through
TRITON_INTERPRET=1 on the CPU.

Both sides draw their randomness from the same counter-based generator, so they must agree token
for token: accept decisions, residual samples, greedy picks and ensemble samples.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from se_engine.ensemble import EnsembleSpec
from se_engine.sampling import STREAM_DRAFT, STREAM_ENSEMBLE, SamplingParams, process_logits, sample
from se_engine.verify import (sample_ensemble, sample_ensemble_reference, sample_ensemble_triton, verify,
                              verify_reference, verify_triton)

WEIGHTED = {2: EnsembleSpec.weighted([0.6, 0.4]), 3: EnsembleSpec.weighted([0.2, 0.3, 0.5])}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LINEAR = {2: EnsembleSpec.contrastive(0.3), 3: EnsembleSpec.linear([1.0, -0.2, 0.4])}


def random_logits(n: int, rows: int, V: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Models that agree in part (shared component + own noise), so drafts are accepted and rejected."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, V, generator=g) * 3
    return [(base + torch.randn(rows, V, generator=g) * 1.5).to(DEVICE, dtype) for _ in range(n)]


def make_verify_inputs(n: int, V: int, counts: list[int], temps: list[float], dtype: torch.dtype, seed: int):
    T = sum(counts)
    logits = random_logits(n, T, V, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    offsets = torch.tensor([0] + counts).cumsum(0)
    params = [SamplingParams(temperature=t) for t in temps]
    seeds = torch.randint(0, 2**62, (len(counts),), generator=g)
    proposer = torch.randint(0, n, (T,), generator=g)
    positions = torch.randint(0, 4096, (T,), generator=g)
    drafts = torch.empty(T, dtype=torch.long)
    for b, t in enumerate(temps):  # each draft drawn from its proposer's q, as the engine does
        for row in range(int(offsets[b]), int(offsets[b + 1])):
            q = process_logits(logits[int(proposer[row])][row:row + 1].cpu(), t, 0, 1.0)
            drafts[row] = sample(q, seeds[b:b + 1], positions[row:row + 1], STREAM_DRAFT)[0]
    on = [x.to(DEVICE) for x in (drafts, proposer, positions, offsets)]
    return logits, *on, params, seeds.to(DEVICE)


VERIFY_CASES = [
    # kind, n, V, counts, temperatures, dtype
    ("weighted", 2, 1000, [3, 1, 4, 2], [1.0, 0.7, 0.0, 1.3], torch.float32),
    ("weighted", 3, 1000, [2, 0, 5], [0.9, 1.0, 0.0], torch.bfloat16),
    ("linear", 2, 1000, [3, 1, 4, 2], [1.0, 0.7, 0.0, 1.3], torch.float32),
    ("linear", 3, 1000, [4, 2], [0.0, 1.1], torch.bfloat16),
    ("weighted", 2, 32000, [3, 2], [1.0, 0.0], torch.bfloat16),
    ("linear", 3, 32000, [2, 3], [0.8, 0.0], torch.float32),
    ("weighted", 2, 151936, [2, 1], [1.0, 0.0], torch.bfloat16),
    ("linear", 2, 151936, [2, 1], [0.8, 0.0], torch.bfloat16),
]


@pytest.mark.parametrize("kind,n,V,counts,temps,dtype", VERIFY_CASES)
def test_verify_kernel_matches_reference(kind, n, V, counts, temps, dtype):
    spec = (WEIGHTED if kind == "weighted" else LINEAR)[n]
    accepted = rejected = 0
    for seed in range(3):
        logits, *rest = make_verify_inputs(n, V, counts, temps, dtype, seed)
        ref = verify_reference(logits, spec, *rest, want_logprobs=True)
        got = verify_triton(logits, spec, *rest, want_logprobs=True)
        assert torch.equal(got.num_accepted, ref.num_accepted)
        assert torch.equal(got.num_emitted, ref.num_emitted)
        assert torch.equal(got.tokens, ref.tokens)
        torch.testing.assert_close(got.logprobs, ref.logprobs, atol=2e-4, rtol=1e-5, equal_nan=True)
        accepted += int(ref.num_accepted.sum())
        rejected += int((ref.num_emitted > ref.num_accepted).sum())
    assert accepted and rejected, "the inputs must exercise both outcomes"


def test_verify_kernel_takes_strided_index_tensors():
    """draft ids, proposers and positions given as columns of one [T, 3] tensor (stride 3)."""
    logits, drafts, proposer, positions, offsets, params, seeds = make_verify_inputs(
        2, 1000, [3, 4], [1.0, 0.8], torch.float32, seed=5)
    columns = torch.stack([drafts, proposer, positions], dim=1)
    ref = verify_reference(logits, WEIGHTED[2], drafts, proposer, positions, offsets, params, seeds)
    got = verify_triton(logits, WEIGHTED[2], *columns.unbind(1), offsets, params, seeds)
    assert torch.equal(got.num_accepted, ref.num_accepted) and torch.equal(got.tokens, ref.tokens)


SAMPLE_CASES = [
    # kind, n, V, temperatures, dtype
    ("weighted", 1, 1000, [1.0, 0.0, 0.6, 1.4], torch.float32),
    ("weighted", 2, 1000, [1.0, 0.0, 0.6, 1.4], torch.bfloat16),
    ("linear", 2, 1000, [1.0, 0.0, 0.6, 1.4], torch.float32),
    ("weighted", 3, 32000, [1.0, 0.0], torch.bfloat16),
    ("linear", 3, 151936, [0.9, 0.0], torch.bfloat16),
]


@pytest.mark.parametrize("kind,n,V,temps,dtype", SAMPLE_CASES)
def test_sample_kernel_matches_reference(kind, n, V, temps, dtype):
    spec = EnsembleSpec.weighted([1.0]) if n == 1 else (WEIGHTED if kind == "weighted" else LINEAR)[n]
    params = [SamplingParams(temperature=t) for t in temps]
    B = len(temps)
    for seed in range(3):
        logits = random_logits(n, B, V, dtype, seed)
        positions = torch.arange(B, device=DEVICE) * 7 + seed
        seeds = torch.arange(B, device=DEVICE) + 1000 * seed
        ref_tokens, ref_lp = sample_ensemble_reference(logits, spec, positions, params, seeds, STREAM_ENSEMBLE, True)
        tokens, lp = sample_ensemble_triton(logits, spec, positions, params, seeds, STREAM_ENSEMBLE, True)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(lp, ref_lp, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["weighted", "linear"])
def test_greedy_ties_go_to_the_lowest_token_id(kind):
    """Exact ties of the maximum in several lanes, tiles and chunks: the lowest id wins, as in torch.argmax."""
    g = torch.Generator().manual_seed(7)
    B, V = 4, 151936
    base = torch.randint(0, 3, (B, V), generator=g).float()
    for b in range(B):  # the top value at a few columns spread over the vocabulary
        base[b, torch.randperm(V - 300, generator=g)[:5] + 300] = 5.0
    logits = [base.to(DEVICE, torch.bfloat16) for _ in range(2)]  # equal models: r ties exactly where they do
    spec = (WEIGHTED if kind == "weighted" else LINEAR)[2]
    params = [SamplingParams(temperature=0.0)] * B
    positions, seeds = torch.arange(B, device=DEVICE), torch.arange(B, device=DEVICE)
    tokens, _ = sample_ensemble_triton(logits, spec, positions, params, seeds, STREAM_ENSEMBLE)
    assert tokens.tolist() == base.argmax(-1).tolist() == [int((row == 5).nonzero()[0]) for row in base]


def test_backend_choice_and_clear_errors():
    logits = random_logits(2, 2, 50, torch.float32, 0)
    positions, seeds = torch.tensor([3, 4], device=DEVICE), torch.tensor([1, 2], device=DEVICE)
    custom = EnsembleSpec.custom(lambda xs: xs[0] + xs[1], 2)
    plain = [SamplingParams(), SamplingParams()]
    # "auto" falls back to the PyTorch reference for what the kernels do not serve.
    for spec, params in ((custom, plain), (WEIGHTED[2], [SamplingParams(top_k=5), SamplingParams()])):
        tokens, _ = sample_ensemble(logits, spec, positions, params, seeds, STREAM_ENSEMBLE, backend="auto")
        ref, _ = sample_ensemble_reference(logits, spec, positions, params, seeds, STREAM_ENSEMBLE)
        assert torch.equal(tokens, ref)
        with pytest.raises(ValueError, match="backend='triton' cannot serve"):
            sample_ensemble(logits, spec, positions, params, seeds, STREAM_ENSEMBLE, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        verify(logits, WEIGHTED[2], torch.tensor([1, 2]), torch.tensor([0, 0]), positions, torch.tensor([0, 2]),
               plain[:1], seeds[:1], backend="cuda")
    five = random_logits(5, 2, 50, torch.float32, 0)
    with pytest.raises(ValueError, match="at most 4 models"):
        sample_ensemble_triton(five, EnsembleSpec.weighted([1.0] * 5), positions, plain, seeds, STREAM_ENSEMBLE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile the kernels for real")
def test_kernels_compile_for_hopper():
    """The interpreter skips Triton's compiler: every kernel variant is compiled for sm_90 here too
    (tools/kernel_compile.py, with the Triton wheel's ptxas; no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parent.parent / "tools" / "kernel_compile.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-1000:]
    assert "kernel variants compiled for sm_90" in proc.stdout
