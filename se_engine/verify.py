"""Speculative verification and ensemble sampling against an ensemble target r.

Math, for each sequence b and its draft positions j = 0 .. n_b - 1 (flattened over the batch
with offsets ``seq_offsets``; row t = seq_offsets[b] + j):

    r_t = Ensemble(logits_1[t], ..., logits_n[t])          (EnsembleSpec.target)
    q_t = process(logits_{proposer[t]}[t])                  (the distribution the draft was drawn from)
    accept x_t  iff  u_t * q_t(x_t) <= r_t(x_t),   u_t = uniform(seed_b, position_t, ACCEPT)
    a_b = number of leading accepted positions of b
    if a_b < n_b:  y_b ~ norm(max(0, r - q)) at the first rejected row (RESIDUAL stream)

Emitted tokens of b: x_0 .. x_{a_b - 1}, then y_b if a_b < n_b. With one-hot q and r (greedy)
this is "accept iff the draft is the ensemble argmax, else emit the argmax" (a greedy q is the
point mass on the draft). Precondition: every sampled draft was drawn from its q (q_t(x_t) > 0).

r is that of the rows' suppressed tokens where ``suppress`` [T, V] is given (a request's stop tokens
before its min_tokens; ``EnsembleSpec.target``); q is never suppressed (a draft of a suppressed token
is rejected, as r gives it 0).

Ensemble sampling (no drafts, one row per sequence) is the same race on r itself:
    y_b ~ r_b  (stream given by the caller: ENSEMBLE for the ensemble, DRAFT + m for model m's draft).

Two implementations with one signature each: ``*_reference`` (PyTorch, any ensemble and any
top-k / top-p; the specification) and ``*_triton`` (the fused kernels of ``triton_kernels.verify``,
imported on first use; weighted and linear ensembles, per-sequence temperature). ``verify`` and
``sample_ensemble`` pick one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from triton_kernels import MAX_MODELS

from .ensemble import EnsembleSpec
from .sampling import STREAM_ACCEPT, STREAM_RESIDUAL, SamplingParams, process_logits, sample, uniform

Backend = Literal["auto", "torch", "triton"]


@dataclass
class VerifyResult:
    num_accepted: Tensor  # [B] int64
    tokens: Tensor        # [B, max_n] int64: accepted drafts, then the residual token; -1 past the end
    num_emitted: Tensor   # [B] int64: num_accepted + (1 if a draft was rejected)
    logprobs: Tensor | None  # [B, max_n] fp32 log r of each emitted token (nan past the end)


def verify_reference(logits: list[Tensor], spec: EnsembleSpec, draft_ids: Tensor, proposer: Tensor,
                     positions: Tensor, seq_offsets: Tensor, params: list[SamplingParams], seeds: Tensor,
                     want_logprobs: bool = False, max_n: int | None = None,
                     suppress: Tensor | None = None) -> VerifyResult:
    """logits: n x [T, V]; draft_ids, proposer, positions: [T] int64 (absolute token positions);
    seq_offsets: [B + 1] int64; params: B per-sequence sampling settings; seeds: [B] int64;
    max_n: the longest segment (computed when None); suppress: [T, V] bool or None."""
    T = draft_ids.shape[0]
    B = seq_offsets.shape[0] - 1
    device = draft_ids.device
    counts = seq_offsets[1:] - seq_offsets[:-1]
    seq_of_row = torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=T)
    local = torch.arange(T, device=device) - seq_offsets[:-1][seq_of_row]

    r = torch.empty(T, logits[0].shape[-1], device=device)
    q = torch.empty_like(r)
    log_r = torch.empty_like(r) if want_logprobs else None
    for b, p in enumerate(params):  # per-sequence settings: one slice each, no per-position loop
        rows = slice(int(seq_offsets[b]), int(seq_offsets[b + 1]))
        seq_logits = [x[rows] for x in logits]
        banned = None if suppress is None else suppress[rows]
        r[rows] = spec.target(seq_logits, p.temperature, p.top_k, p.top_p, banned)
        if p.greedy:  # a greedy proposer's law is the point mass on the token it chose
            q[rows] = torch.zeros_like(q[rows]).scatter_(1, draft_ids[rows, None], 1.0)
        else:
            own = torch.stack(seq_logits)[proposer[rows], torch.arange(rows.stop - rows.start, device=device)]
            q[rows] = process_logits(own, p.temperature, p.top_k, p.top_p)
        if log_r is not None:
            log_r[rows] = spec.log_target(seq_logits, p.temperature, p.top_k, p.top_p, banned)

    row_seeds = seeds[seq_of_row]
    u = uniform(row_seeds, positions, STREAM_ACCEPT)
    idx = torch.arange(T, device=device)
    accept = u * q[idx, draft_ids] <= r[idx, draft_ids]

    # First rejected local index per sequence (n_b if none): a segmented min.
    first_reject = counts.clone()
    rejected_local = torch.where(accept, torch.full_like(local, T), local)
    first_reject.scatter_reduce_(0, seq_of_row, rejected_local, reduce="amin")
    num_accepted = first_reject
    has_residual = num_accepted < counts
    num_emitted = num_accepted + has_residual.long()

    max_n = max_n if max_n is not None else (int(counts.max()) if B else 0)
    tokens = torch.full((B, max_n), -1, dtype=torch.long, device=device)
    keep = local < num_accepted[seq_of_row]
    tokens[seq_of_row[keep], local[keep]] = draft_ids[keep]
    rej_rows = (seq_offsets[:-1] + num_accepted)[has_residual]
    if rej_rows.numel():
        residual = (r[rej_rows] - q[rej_rows]).clamp_min(0)
        # r == q up to rounding leaves no residual mass; then r itself is the right law.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, r[rej_rows])
        y = sample(residual, row_seeds[rej_rows], positions[rej_rows], STREAM_RESIDUAL)
        tokens[has_residual.nonzero()[:, 0], num_accepted[has_residual]] = y

    logprobs = None
    if log_r is not None:
        logprobs = torch.full((B, max_n), float("nan"), device=device)
        emitted = local < num_emitted[seq_of_row]
        rows_e = idx[emitted]
        tok_e = tokens[seq_of_row[emitted], local[emitted]]
        logprobs[seq_of_row[emitted], local[emitted]] = log_r[rows_e, tok_e]
    return VerifyResult(num_accepted, tokens, num_emitted, logprobs)


def sample_ensemble_reference(logits: list[Tensor], spec: EnsembleSpec, positions: Tensor,
                              params: list[SamplingParams], seeds: Tensor, stream: int,
                              want_logprobs: bool = False, suppress: Tensor | None = None
                              ) -> tuple[Tensor, Tensor | None]:
    """logits: n x [B, V], one row per sequence; positions, seeds: [B] int64; suppress: [B, V] bool or None.
    Returns tokens [B] int64 drawn from r, and log r(token) [B] fp32 when asked."""
    def banned(b: int) -> Tensor | None:
        return None if suppress is None else suppress[b:b + 1]

    r = torch.cat([spec.target([x[b:b + 1] for x in logits], p.temperature, p.top_k, p.top_p, banned(b))
                   for b, p in enumerate(params)])
    tokens = sample(r, seeds, positions, stream)
    if not want_logprobs:
        return tokens, None
    log_r = torch.cat([spec.log_target([x[b:b + 1] for x in logits], p.temperature, p.top_k, p.top_p, banned(b))
                       for b, p in enumerate(params)])
    return tokens, log_r.gather(1, tokens[:, None])[:, 0]


def _kernels():
    """The fused kernels' module: Triton loads only when they run."""
    from triton_kernels import verify as kernels

    return kernels


def _check_fused(spec: EnsembleSpec, params: list[SamplingParams], num_models: int, suppress: Tensor | None) -> None:
    why = fused_unsupported(spec, params, num_models)
    if why is None and suppress is not None:
        why = "suppressed tokens (min_tokens) run in PyTorch"
    if why:
        raise ValueError(f"the fused kernels cannot serve this call: {why}")


def _temperatures(params: list[SamplingParams], device: torch.device) -> Tensor:
    """[B] fp32: each sequence's temperature (0: greedy), as the kernels take it."""
    return torch.tensor([float(p.temperature) for p in params], dtype=torch.float32, device=device)


def verify_triton(logits: list[Tensor], spec: EnsembleSpec, draft_ids: Tensor, proposer: Tensor,
                  positions: Tensor, seq_offsets: Tensor, params: list[SamplingParams], seeds: Tensor,
                  want_logprobs: bool = False, max_n: int | None = None,
                  suppress: Tensor | None = None) -> VerifyResult:
    """The fused twin of verify_reference (same arguments, same result; no suppressed tokens)."""
    _check_fused(spec, params, len(logits), suppress)
    counts = seq_offsets[1:] - seq_offsets[:-1]
    max_n = max_n if max_n is not None else (int(counts.max()) if params else 0)
    num_accepted, tokens, num_emitted, logprobs = _kernels().verify(
        logits, spec.coefficients, spec.kind == "linear", draft_ids, proposer, positions, seq_offsets,
        _temperatures(params, draft_ids.device), seeds, STREAM_RESIDUAL, want_logprobs, max_n)
    return VerifyResult(num_accepted, tokens, num_emitted, logprobs)


def sample_ensemble_triton(logits: list[Tensor], spec: EnsembleSpec, positions: Tensor,
                           params: list[SamplingParams], seeds: Tensor, stream: int,
                           want_logprobs: bool = False, suppress: Tensor | None = None
                           ) -> tuple[Tensor, Tensor | None]:
    """The fused twin of sample_ensemble_reference (no suppressed tokens)."""
    _check_fused(spec, params, len(logits), suppress)
    return _kernels().sample(logits, spec.coefficients, spec.kind == "linear", positions,
                             _temperatures(params, positions.device), seeds, stream, want_logprobs)


def fused_unsupported(spec: EnsembleSpec, params: list[SamplingParams], num_models: int) -> str | None:
    """Why the fused kernels cannot serve this call (None if they can)."""
    if spec.kind == "custom":
        return "custom ensembles run in PyTorch"
    if num_models > MAX_MODELS:
        return f"the fused kernels take at most {MAX_MODELS} models, got {num_models}"
    if filtered := [p for p in params if p.top_k or p.top_p < 1.0]:
        return f"top_k / top_p run in PyTorch, got top_k={filtered[0].top_k}, top_p={filtered[0].top_p}"
    if with_min := [p for p in params if p.min_tokens]:
        return f"min_tokens runs in PyTorch, got min_tokens={with_min[0].min_tokens}"
    return None


def _use_triton(backend: Backend, spec: EnsembleSpec, params: list[SamplingParams], logits: list[Tensor]) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return False
    why = fused_unsupported(spec, params, len(logits))
    if backend == "triton" and why:
        raise ValueError(f"backend='triton' cannot serve this request: {why}")
    return why is None and (backend == "triton" or logits[0].is_cuda)


def verify(logits: list[Tensor], spec: EnsembleSpec, draft_ids: Tensor, proposer: Tensor, positions: Tensor,
           seq_offsets: Tensor, params: list[SamplingParams], seeds: Tensor, want_logprobs: bool = False,
           max_n: int | None = None, backend: Backend = "auto", suppress: Tensor | None = None) -> VerifyResult:
    """backend "auto": the fused kernels on CUDA when they support the call, else PyTorch."""
    impl = verify_triton if _use_triton(backend, spec, params, logits) else verify_reference
    return impl(logits, spec, draft_ids, proposer, positions, seq_offsets, params, seeds, want_logprobs, max_n,
                suppress)


def sample_ensemble(logits: list[Tensor], spec: EnsembleSpec, positions: Tensor, params: list[SamplingParams],
                    seeds: Tensor, stream: int, want_logprobs: bool = False,
                    backend: Backend = "auto", suppress: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    impl = sample_ensemble_triton if _use_triton(backend, spec, params, logits) else sample_ensemble_reference
    return impl(logits, spec, positions, params, seeds, stream, want_logprobs, suppress)
