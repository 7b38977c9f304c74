"""Speculative verification against an ensemble target: the PyTorch reference.

Math, for each sequence b and its draft positions j = 0 .. n_b - 1 (flattened over the batch
with offsets ``seq_offsets``; row t = seq_offsets[b] + j):

    r_t = Ensemble(logits_1[t], ..., logits_n[t])          (EnsembleSpec.target)
    q_t = process(logits_{proposer[t]}[t])                  (the distribution the draft was drawn from)
    accept x_t  iff  u_t * q_t(x_t) <= r_t(x_t),   u_t = uniform(seed_b, position_t, ACCEPT)
    a_b = number of leading accepted positions of b
    if a_b < n_b:  y_b ~ norm(max(0, r - q)) at the first rejected row (RESIDUAL stream)

Emitted tokens of b: x_0 .. x_{a_b - 1}, then y_b if a_b < n_b. With one-hot q and r (greedy)
this is "accept iff the draft is the ensemble argmax, else emit the argmax". The fused Triton
kernel of the kernels issue is a drop-in twin of this function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from se_engine.ensemble import EnsembleSpec
from se_engine.sampling import STREAM_ACCEPT, STREAM_RESIDUAL, SamplingParams, process_logits, sample, uniform


@dataclass
class VerifyResult:
    num_accepted: Tensor  # [B] int64
    tokens: Tensor        # [B, max_n] int64: accepted drafts, then the residual token; -1 past the end
    num_emitted: Tensor   # [B] int64: num_accepted + (1 if a draft was rejected)
    logprobs: Tensor | None  # [B, max_n] fp32 log r of each emitted token (nan past the end)


def verify_reference(logits: list[Tensor], spec: EnsembleSpec, draft_ids: Tensor, proposer: Tensor,
                     positions: Tensor, seq_offsets: Tensor, params: list[SamplingParams], seeds: Tensor,
                     want_logprobs: bool = False) -> VerifyResult:
    """logits: n x [T, V]; draft_ids, proposer, positions: [T] int64 (absolute token positions);
    seq_offsets: [B + 1] int64; params: B per-sequence sampling settings; seeds: [B] int64."""
    T = draft_ids.shape[0]
    B = seq_offsets.shape[0] - 1
    device = draft_ids.device
    counts = seq_offsets[1:] - seq_offsets[:-1]
    seq_of_row = torch.repeat_interleave(torch.arange(B, device=device), counts)
    local = torch.arange(T, device=device) - seq_offsets[:-1][seq_of_row]

    r = torch.empty(T, logits[0].shape[-1], device=device)
    q = torch.empty_like(r)
    log_r = torch.empty_like(r) if want_logprobs else None
    for b, p in enumerate(params):  # per-sequence settings: one slice each, no per-position loop
        rows = slice(int(seq_offsets[b]), int(seq_offsets[b + 1]))
        seq_logits = [x[rows] for x in logits]
        r[rows] = spec.target(seq_logits, p.temperature, p.top_k, p.top_p)
        own = torch.stack(seq_logits)[proposer[rows], torch.arange(rows.stop - rows.start, device=device)]
        q[rows] = process_logits(own, p.temperature, p.top_k, p.top_p)
        if log_r is not None:
            log_r[rows] = spec.log_target(seq_logits, p.temperature, p.top_k, p.top_p)

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

    max_n = int(counts.max()) if B else 0
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
