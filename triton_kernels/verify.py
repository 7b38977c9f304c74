"""Fused Triton kernels for speculative verification and ensemble sampling.

The math, and its PyTorch specification, is ``se_engine.verify`` (whose ``verify_triton`` and
``sample_ensemble_triton`` call ``verify`` and ``sample`` here). Plain-tensor signatures: an ensemble
comes as its coefficients (weights, or linear c_k) and whether it is linear, each sequence's sampling
settings as its temperature; nothing here imports the engine.

Three launches, no host synchronisation. Each row's vocabulary is cut into S chunks of a fixed size
(``_tiling``: per device and V, not per batch, so every row's result is the same alone or batched);
every chunk program streams its slice of all n models' logits.

1. _stats_kernel  grid (T, S): per row and chunk, the online max m and sum exp(x - m) of each
   distribution the step needs, reading every logit once (kept per lane across the chunk's tiles
   and reduced once at its end: no block-wide reduction inside the loop):
       weighted:  slot k = l_k / tau  (k < n)        linear:  slot 0 = z / tau, z = sum_k c_k l_k;
                                                              slot 1 = l_proposer / tau
   (tau = 1 on greedy rows), and for linear ensembles the chunk's argmax of z.
   Combining the chunks gives lse = log sum_v exp(x_v) per slot, so p_v = exp(x_v - lse).
2. _pick_kernel   grid (B, S): per sequence, the acceptance test in log space on the gathered
   draft logits,
       accept x  iff  log u + log q(x) <= log r(x),
       log r(x) = logsumexp_k(log lambda_k + l_k(x) / tau - lse_k)    (weighted)
                = z(x) / tau - lse_z                                   (linear),
   then, at the first rejected row only, the chunk's exponential race on the residual and on r
       argmax_v log max(0, r_v - q_v) - log E_v,   E_v = -log u_v        (no residual tensor,
   no normalisation, no sort); greedy weighted rows instead take the chunk argmax of the T = 1
   mixture at every row. Sampling mode (no drafts) races on r at the sequence's single row.
3. _finish_kernel grid (B): combines the chunk winners (ties -> lowest token id) and writes the
   accepted counts, tokens and logprobs.

The uniforms are the counter-based hash of se_engine.sampling bit for bit (the acceptance test's
stream is its STREAM_ACCEPT, 1), so the kernels pick the reference's tokens except where
floating-point rounding splits a near-tie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import MAX_MODELS


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _key(seed, position, stream):
    """se_engine.sampling._key: (int64 seed, int64 position, stream) -> uint32."""
    h = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    h = _mix32(h ^ (position & 0xFFFFFFFF).to(tl.uint32))
    return _mix32(h ^ stream)


@triton.jit
def _uniform(h):
    """uint32 hash -> fp32 in (0, 1) from its top 23 bits (se_engine.sampling.uniform)."""
    return ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _logits(L0, L1, L2, L3, s0, s1, s2, s3, k: tl.constexpr, row, cols, mask):
    """Model k's logits at (row, cols) in fp32; 0 where masked (callers mask the result)."""
    if k == 0:
        ptr = L0 + row * s0
    elif k == 1:
        ptr = L1 + row * s1
    elif k == 2:
        ptr = L2 + row * s2
    else:
        ptr = L3 + row * s3
    return tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _select(a0, a1, a2, a3, k: tl.constexpr):
    """The k-th of four per-model scalars (Triton has no lists)."""
    if k == 0:
        return a0
    elif k == 1:
        return a1
    elif k == 2:
        return a2
    else:
        return a3


@triton.jit
def _combine(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, row, cols, mask, p, N: tl.constexpr):
    """(z = sum_k c_k l_k, l_p) at (row, cols): the linear ensemble's logits and the proposer's."""
    z = tl.zeros_like(cols).to(tl.float32)
    lp = tl.zeros_like(cols).to(tl.float32)
    for k in tl.static_range(N):
        lk = _logits(L0, L1, L2, L3, s0, s1, s2, s3, k, row, cols, mask)
        z += _select(c0, c1, c2, c3, k) * lk
        lp = tl.where(p == k, lk, lp)
    return z, lp


@triton.jit
def _online(m, s, x):
    """Per-lane running (max, sum exp(x - max)) [BLOCK] updated with a tile x (masked lanes -inf)."""
    m_new = tl.maximum(m, x)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    # One of m, x is the new max, so one exp serves: it rescales the old sum or weighs the new term.
    e = tl.exp(tl.minimum(m, x) - m_safe)
    return m_new, tl.where(x > m, s * e + 1.0, s + e)


@triton.jit
def _total(m, s):
    """Per-lane _online states reduced to one (max, sum exp(x - max))."""
    top = tl.max(m, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    return top, tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top_safe)), 0)


@triton.jit
def _lse_add(m, s, a):
    """Running scalar logsumexp state (max, sum exp(. - max)) updated with one term a."""
    m_new = tl.maximum(m, a)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - m_safe) + tl.exp(a - m_safe)


@triton.jit
def _best(best, best_idx, score, cols):
    """Per-lane running argmax [BLOCK] over tiles; a lane keeps its earliest index on ties."""
    take = score > best
    return tl.where(take, score, best), tl.where(take, cols, best_idx)


@triton.jit
def _argmax(best, best_idx):
    """Per-lane _best states reduced to (best value, its lowest index)."""
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, best_idx, 2**30), 0)


@triton.jit
def _lanes(lo, BLOCK: tl.constexpr):
    """Initial per-lane states: -inf values and index lo."""
    return tl.full([BLOCK], float("-inf"), tl.float32), tl.full([BLOCK], 0, tl.int32) + lo


@triton.jit
def _lse(stats_ptr, row, slot, S, NSLOT: tl.constexpr, BLOCK_S: tl.constexpr):
    """log sum_v exp(x_v) of one slot of one row, combined over the S chunks."""
    offs = tl.arange(0, BLOCK_S)
    base = stats_ptr + (row * S + offs) * (NSLOT * 2) + slot * 2
    m = tl.load(base, mask=offs < S, other=float("-inf"))
    s = tl.load(base + 1, mask=offs < S, other=0.0)
    top = tl.max(m, 0)
    return top + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), 0))


@triton.jit
def _lses(stats_ptr, row, S, NSLOT: tl.constexpr, BLOCK_S: tl.constexpr):
    """_lse of the row's first min(NSLOT, 4) slots (0.0 for slots that do not exist)."""
    lse0 = _lse(stats_ptr, row, 0, S, NSLOT, BLOCK_S)
    lse1 = 0.0
    lse2 = 0.0
    lse3 = 0.0
    if NSLOT > 1:
        lse1 = _lse(stats_ptr, row, 1, S, NSLOT, BLOCK_S)
    if NSLOT > 2:
        lse2 = _lse(stats_ptr, row, 2, S, NSLOT, BLOCK_S)
    if NSLOT > 3:
        lse3 = _lse(stats_ptr, row, 3, S, NSLOT, BLOCK_S)
    return lse0, lse1, lse2, lse3


@triton.jit
def _winner(val_ptr, idx_ptr, base, stride, S, BLOCK_S: tl.constexpr):
    """Combines S chunk winners (value, index): the best value, ties -> lowest index."""
    offs = tl.arange(0, BLOCK_S)
    v = tl.load(val_ptr + base + offs * stride, mask=offs < S, other=float("-inf"))
    i = tl.load(idx_ptr + base + offs * stride, mask=offs < S, other=2**30)
    top = tl.max(v, 0)
    return top, tl.min(tl.where(v == top, i, 2**30), 0)


@triton.jit
def _log_r_q(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, stats_ptr, row, x, p, t, S,
             N: tl.constexpr, LINEAR: tl.constexpr, BLOCK_S: tl.constexpr):
    """(log r(x), log q(x)) at one row from the gathered logits; p = proposer, t = temperature."""
    if LINEAR:
        z, lp = _combine(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, row, x, True, p, N)
        log_r = z / t - _lse(stats_ptr, row, 0, S, 2, BLOCK_S)
        log_q = lp / t - _lse(stats_ptr, row, 1, S, 2, BLOCK_S)
    else:
        m = float("-inf")
        s = 0.0
        log_q = 0.0
        for k in tl.static_range(N):
            a = _logits(L0, L1, L2, L3, s0, s1, s2, s3, k, row, x, True) / t - _lse(stats_ptr, row, k, S, N, BLOCK_S)
            log_q = tl.where(p == k, a, log_q)
            m, s = _lse_add(m, s, tl.log(_select(c0, c1, c2, c3, k)) + a)
        log_r = m + tl.log(s)
    return log_r, log_q


@triton.jit
def _first_reject(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, stats_ptr, draft_ptr, proposer_ptr,
                  positions_ptr, start, n, seed, t, S, N: tl.constexpr, LINEAR: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Number of leading accepted drafts of one sequence (its rows start .. start + n - 1)."""
    j = tl.full([], 0, tl.int32)
    go = n > 0
    while go:
        row = start + j
        log_r, log_q = _log_r_q(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, stats_ptr, row,
                                tl.load(draft_ptr + row), tl.load(proposer_ptr + row), t, S, N, LINEAR, BLOCK_S)
        u = _uniform(_key(seed, tl.load(positions_ptr + row), 1))  # STREAM_ACCEPT
        ok = tl.log(u) + log_q <= log_r
        j += ok.to(tl.int32)
        go = ok & (j < n)
    return j


@triton.jit
def _stats_kernel(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, row_temp_ptr, proposer_ptr,
                  stats_ptr, amax_val_ptr, amax_idx_ptr, V, chunk,
                  N: tl.constexpr, LINEAR: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    S = tl.num_programs(1)
    tau = tl.load(row_temp_ptr + row)
    t = tl.where(tau > 0, tau, 1.0)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    if LINEAR:
        p = tl.load(proposer_ptr + row)
        best, best_idx = _lanes(lo, BLOCK)
        m_z, s_z = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.float32)
        m_p, s_p = m_z, s_z
        for v0 in range(lo, hi, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            mask = cols < hi
            z, lp = _combine(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, row, cols, mask, p, N)
            z = tl.where(mask, z, float("-inf"))
            m_z, s_z = _online(m_z, s_z, z / t)
            m_p, s_p = _online(m_p, s_p, tl.where(mask, lp / t, float("-inf")))
            best, best_idx = _best(best, best_idx, z, cols)
        m_z, s_z = _total(m_z, s_z)
        m_p, s_p = _total(m_p, s_p)
        best, best_idx = _argmax(best, best_idx)
        out = stats_ptr + (row * S + split) * 4
        tl.store(out, m_z)
        tl.store(out + 1, s_z)
        tl.store(out + 2, m_p)
        tl.store(out + 3, s_p)
        tl.store(amax_val_ptr + row * S + split, best)
        tl.store(amax_idx_ptr + row * S + split, best_idx)
    else:
        for k in tl.static_range(N):
            m, s = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.float32)
            for v0 in range(lo, hi, BLOCK):
                cols = v0 + tl.arange(0, BLOCK)
                mask = cols < hi
                x = _logits(L0, L1, L2, L3, s0, s1, s2, s3, k, row, cols, mask)
                m, s = _online(m, s, tl.where(mask, x / t, float("-inf")))
            m, s = _total(m, s)
            out = stats_ptr + ((row * S + split) * N + k) * 2
            tl.store(out, m)
            tl.store(out + 1, s)


@triton.jit
def _pick_kernel(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, seq_offsets_ptr, seq_temp_ptr, seq_seed_ptr,
                 draft_ptr, proposer_ptr, positions_ptr, stats_ptr, amax_val_ptr, amax_idx_ptr,
                 race_val_ptr, race_idx_ptr, V, chunk, stream,
                 N: tl.constexpr, LINEAR: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    S = tl.num_programs(1)
    start = tl.load(seq_offsets_ptr + b)
    n = tl.load(seq_offsets_ptr + b + 1) - start
    tau = tl.load(seq_temp_ptr + b)
    seed = tl.load(seq_seed_ptr + b)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    NSLOT: tl.constexpr = 2 if LINEAR else N
    if tau > 0:
        if SAMPLE:
            j = tl.full([], 0, tl.int32)
        else:
            j = _first_reject(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, stats_ptr, draft_ptr, proposer_ptr,
                              positions_ptr, start, n, seed, tau, S, N, LINEAR, BLOCK_S)
        if j < n:
            row = (start + j).to(tl.int64)
            p = tl.load(proposer_ptr + row)
            h = _key(seed, tl.load(positions_ptr + row), stream)
            lse0, lse1, lse2, lse3 = _lses(stats_ptr, row, S, NSLOT, BLOCK_S)
            best_res, idx_res = _lanes(lo, BLOCK)
            best_r, idx_r = best_res, idx_res
            for v0 in range(lo, hi, BLOCK):
                cols = v0 + tl.arange(0, BLOCK)
                mask = cols < hi
                r = tl.zeros([BLOCK], tl.float32)
                q = tl.zeros([BLOCK], tl.float32)
                if LINEAR:
                    z, q = _combine(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, row, cols, mask, p, N)
                    r = tl.exp(z / tau - lse0)
                    q = tl.exp(q / tau - lse1)
                else:
                    for k in tl.static_range(N):
                        lk = _logits(L0, L1, L2, L3, s0, s1, s2, s3, k, row, cols, mask)
                        e = tl.exp(lk / tau - _select(lse0, lse1, lse2, lse3, k))
                        r += _select(c0, c1, c2, c3, k) * e
                        q = tl.where(p == k, e, q)
                if SAMPLE:
                    q = tl.zeros([BLOCK], tl.float32)
                log_e = tl.log(-tl.log(_uniform(_mix32(h ^ cols.to(tl.uint32)))))
                res = tl.maximum(r - q, 0.0)
                keep_res = mask & (res > 0)
                keep_r = mask & (r > 0)
                best_res, idx_res = _best(best_res, idx_res, tl.where(keep_res, tl.log(res) - log_e, float("-inf")),
                                          cols)
                best_r, idx_r = _best(best_r, idx_r, tl.where(keep_r, tl.log(r) - log_e, float("-inf")), cols)
            best_res, idx_res = _argmax(best_res, idx_res)
            best_r, idx_r = _argmax(best_r, idx_r)
            out = (b * S + split) * 2
            tl.store(race_val_ptr + out, best_res)
            tl.store(race_idx_ptr + out, idx_res)
            tl.store(race_val_ptr + out + 1, best_r)
            tl.store(race_idx_ptr + out + 1, idx_r)
    elif not LINEAR:  # greedy weighted: the chunk argmax of the T = 1 mixture at every row
        for i in range(n):  # not j: a variable of both branches of a runtime if must keep one type
            row = (start + i).to(tl.int64)
            lse0, lse1, lse2, lse3 = _lses(stats_ptr, row, S, NSLOT, BLOCK_S)
            best, best_idx = _lanes(lo, BLOCK)
            for v0 in range(lo, hi, BLOCK):
                cols = v0 + tl.arange(0, BLOCK)
                mask = cols < hi
                r = tl.zeros([BLOCK], tl.float32)
                for k in tl.static_range(N):
                    lk = _logits(L0, L1, L2, L3, s0, s1, s2, s3, k, row, cols, mask)
                    r += _select(c0, c1, c2, c3, k) * tl.exp(lk - _select(lse0, lse1, lse2, lse3, k))
                best, best_idx = _best(best, best_idx, tl.where(mask, r, float("-inf")), cols)
            best, best_idx = _argmax(best, best_idx)
            tl.store(amax_val_ptr + row * S + split, best)
            tl.store(amax_idx_ptr + row * S + split, best_idx)


@triton.jit
def _finish_kernel(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, seq_offsets_ptr, seq_temp_ptr, seq_seed_ptr,
                   draft_ptr, proposer_ptr, positions_ptr, stats_ptr, amax_val_ptr, amax_idx_ptr,
                   race_val_ptr, race_idx_ptr, num_accepted_ptr, tokens_ptr, logprobs_ptr, max_n, S,
                   N: tl.constexpr, LINEAR: tl.constexpr, SAMPLE: tl.constexpr, WANT_LOGPROBS: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(seq_offsets_ptr + b)
    n = tl.load(seq_offsets_ptr + b + 1) - start
    tau = tl.load(seq_temp_ptr + b)
    seed = tl.load(seq_seed_ptr + b)
    token = tl.full([], -1, tl.int32)
    a = tl.full([], 0, tl.int32)
    if tau > 0:
        if not SAMPLE:
            a = _first_reject(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, stats_ptr, draft_ptr, proposer_ptr,
                              positions_ptr, start, n, seed, tau, S, N, LINEAR, BLOCK_S)
        if a < n:
            best_res, idx_res = _winner(race_val_ptr, race_idx_ptr, b * S * 2, 2, S, BLOCK_S)
            best_r, idx_r = _winner(race_val_ptr, race_idx_ptr, b * S * 2 + 1, 2, S, BLOCK_S)
            # r == q up to rounding leaves no residual mass; then r itself is the right law.
            token = tl.where(best_res > float("-inf"), idx_res, idx_r)
    else:
        if not SAMPLE:
            go = n > 0
            while go:
                _, top = _winner(amax_val_ptr, amax_idx_ptr, (start + a) * S, 1, S, BLOCK_S)
                ok = tl.load(draft_ptr + start + a) == top
                a += ok.to(tl.int32)
                go = ok & (a < n)
        if a < n:
            _, token = _winner(amax_val_ptr, amax_idx_ptr, (start + a) * S, 1, S, BLOCK_S)
    emitted = a + (a < n).to(tl.int32)
    tl.store(num_accepted_ptr + b, a)
    t = tl.where(tau > 0, tau, 1.0)
    for j in range(max_n):
        row = start + j
        tok = tl.where(j < a, tl.load(draft_ptr + row, mask=j < n, other=0), token)
        tok = tl.where(j < emitted, tok, -1)
        tl.store(tokens_ptr + b * max_n + j, tok)
        if WANT_LOGPROBS:
            lp = tl.full([], float("nan"), tl.float32)
            if j < emitted:
                lp, _ = _log_r_q(L0, L1, L2, L3, s0, s1, s2, s3, c0, c1, c2, c3, stats_ptr, row, tok, 0, t, S,
                                 N, LINEAR, BLOCK_S)
            tl.store(logprobs_ptr + b * max_n + j, lp)


def _tiling(device: torch.device, V: int) -> tuple[int, int]:
    """(vocabulary tile per loop step, tiles per chunk): fixed per device and V, never per batch,
    so that a row's statistics combine the same chunks in the same order whatever else the call
    carries (batch-invariant sampling)."""
    if device.type == "cuda":
        return 1024, 4  # V = 151,936: 38 chunk programs per row
    # The interpreter: a few wide programs, but still several tiles and chunks per row.
    return min(4096, max(128, triton.next_power_of_2(triton.cdiv(V, 8)))), 2


def _launch(logits: list[Tensor], coefficients: tuple[float, ...], linear: bool, seq_offsets: Tensor,
            seq_temp: Tensor, row_temp: Tensor, seeds: Tensor, draft_ids: Tensor, proposer: Tensor,
            positions: Tensor, stream: int, sample_mode: bool, max_n: int,
            want_logprobs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The three launches; returns (num_accepted [B] int32, tokens [B, max_n] int64, logprobs | None).
    seq_temp [B] and row_temp [T]: the temperature of each sequence and of each row's sequence."""
    if len(logits) > MAX_MODELS:
        raise ValueError(f"the fused kernels take at most {MAX_MODELS} models, got {len(logits)}")
    if any(x.shape != logits[0].shape or x.stride(-1) != 1 for x in logits):
        raise ValueError("every model's logits must have the same shape [T, V] with unit stride over V")
    T, V = logits[0].shape
    B = seq_temp.shape[0]
    n = len(logits)
    # The kernels index these with unit stride; callers may pass columns of one int tensor.
    seq_offsets, seeds, draft_ids, proposer, positions = (
        x.contiguous() for x in (seq_offsets, seeds, draft_ids, proposer, positions))
    device = logits[0].device
    block, tiles = _tiling(device, V)
    chunk = block * tiles
    splits = triton.cdiv(V, chunk)
    block_s = triton.next_power_of_2(splits)
    ptrs = list(logits) + [logits[0]] * (MAX_MODELS - n)
    strides = [x.stride(0) for x in ptrs]
    coef = list(coefficients) + [0.0] * (MAX_MODELS - n)
    models = (*ptrs, *strides, *coef)
    nslot = 2 if linear else n
    stats = torch.empty(T, splits, nslot, 2, dtype=torch.float32, device=device)
    amax_val = torch.empty(T, splits, dtype=torch.float32, device=device)
    amax_idx = torch.empty(T, splits, dtype=torch.int32, device=device)
    race_val = torch.empty(B, splits, 2, dtype=torch.float32, device=device)
    race_idx = torch.empty(B, splits, 2, dtype=torch.int32, device=device)
    num_accepted = torch.empty(B, dtype=torch.int32, device=device)
    tokens = torch.empty(B, max_n, dtype=torch.int64, device=device)
    logprobs = torch.empty(B, max_n, dtype=torch.float32, device=device) if want_logprobs else None
    common = (seq_offsets, seq_temp, seeds, draft_ids, proposer, positions, stats, amax_val, amax_idx,
              race_val, race_idx)
    if T:
        _stats_kernel[(T, splits)](*models, row_temp, proposer, stats, amax_val, amax_idx, V, chunk,
                                   N=n, LINEAR=linear, BLOCK=block)
    if B:
        _pick_kernel[(B, splits)](*models, *common, V, chunk, stream, N=n, LINEAR=linear, SAMPLE=sample_mode,
                                  BLOCK=block, BLOCK_S=block_s)
        _finish_kernel[(B,)](*models, *common, num_accepted, tokens, logprobs if want_logprobs else race_val,
                             max_n, splits, N=n, LINEAR=linear, SAMPLE=sample_mode, WANT_LOGPROBS=want_logprobs,
                             BLOCK_S=block_s)
    return num_accepted, tokens, logprobs


def verify(logits: list[Tensor], coefficients: tuple[float, ...], linear: bool, draft_ids: Tensor,
           proposer: Tensor, positions: Tensor, seq_offsets: Tensor, temperatures: Tensor, seeds: Tensor,
           stream: int, want_logprobs: bool, max_n: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Verifies T draft rows of B sequences against r (``se_engine.verify.verify_reference``).

    logits: n <= MAX_MODELS tensors [T, V] of one shape, unit stride over V.
    coefficients: n floats: the weights (weighted) or the c_k (linear) of r.
    linear: r = process(sum_k c_k l_k) instead of the mixture sum_k w_k process(l_k).
    draft_ids, proposer, positions: [T] int64: each row's draft, its proposer's index in logits,
        its absolute token position.
    seq_offsets: [B + 1] int64: sequence b's rows are seq_offsets[b] .. seq_offsets[b + 1] - 1.
    temperatures: [B] fp32: each sequence's temperature (0: greedy).
    seeds: [B] int64: each sequence's seed.
    stream: the random stream of the residual sample.
    want_logprobs: also return log r of each emitted token.
    max_n: the longest segment (columns of the results).
    Returns num_accepted [B] int64, tokens [B, max_n] int64 (-1 past the emitted ones), num_emitted [B]
    int64, and logprobs [B, max_n] fp32 (nan past the emitted ones) or None."""
    T = draft_ids.shape[0]
    B = temperatures.shape[0]
    counts = seq_offsets[1:] - seq_offsets[:-1]
    seq_of_row = torch.repeat_interleave(torch.arange(B, device=draft_ids.device), counts, output_size=T)
    num_accepted, tokens, logprobs = _launch(
        logits, coefficients, linear, seq_offsets, temperatures, temperatures[seq_of_row], seeds, draft_ids,
        proposer, positions, stream, False, max_n, want_logprobs)
    num_accepted = num_accepted.long()
    return num_accepted, tokens, num_accepted + (num_accepted < counts).long(), logprobs


def sample(logits: list[Tensor], coefficients: tuple[float, ...], linear: bool, positions: Tensor,
           temperatures: Tensor, seeds: Tensor, stream: int, want_logprobs: bool) -> tuple[Tensor, Tensor | None]:
    """One token from r per sequence (``se_engine.verify.sample_ensemble_reference``).

    logits: n <= MAX_MODELS tensors [B, V] of one shape, unit stride over V, one row per sequence.
    coefficients, linear: r, as for ``verify``.
    positions, seeds: [B] int64: each sequence's position and seed.
    temperatures: [B] fp32: each sequence's temperature (0: greedy).
    stream: the random stream of the draw.
    want_logprobs: also return log r of each token.
    Returns tokens [B] int64 and log r(token) [B] fp32 or None."""
    rows = torch.arange(temperatures.shape[0] + 1, device=positions.device)
    _, tokens, logprobs = _launch(logits, coefficients, linear, rows, temperatures, temperatures, seeds, positions,
                                  positions, positions, stream, True, 1, want_logprobs)
    return tokens[:, 0], None if logprobs is None else logprobs[:, 0]
