"""Batch-invariant matmul and attention for the GPU: one fixed tiling, whatever the batch.

The GPU twins of ``se_engine.invariant_ops`` (whose fp32 ``*_reference`` functions are their
specification too). A result is batch-invariant when no output element's order of operations depends
on what else the call computes:

    linear     y = x @ w^T + b: one program per [BLOCK_M, BLOCK_N] output tile, the K loop in
               BLOCK_K steps from 0, fp32 accumulation, one rounding to the output dtype. The block
               sizes are constants (never chosen from M), and K is never split across programs, so
               row m's outputs are the same in a 1-row decode and a 272-row verify.
    attention  one program per (query, head): online softmax over its own keys 0 .. position in
               BLOCK_KV blocks counted from key 0, keys past the position masked to -inf (a masked
               key adds an exact 0). The result depends on the query and its keys alone: not on
               the other queries, on padded cells, nor on how far the cache extends.

Plain-tensor signatures; nothing here imports the engine.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
BLOCK_KV = 64
# Triton's interpreter (the CPU tests) misreads bf16 operands of tl.dot: there the tiles are upcast
# (exactly) and multiplied in fp32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, positions_ptr, out_ptr, Hq, Hkv, S, scale, window, softcap,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    position = tl.load(positions_ptr + t)
    first = tl.where(window > 0, tl.maximum(position - window + 1, 0), 0)  # blocks start at the query's own first key
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (t * Hq + h) * D + dims, mask=dims < D, other=0.0).to(tl.float32)
    base = (slot * Hkv + h // (Hq // Hkv)) * S * D
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j0 in range(first, position + 1, BLOCK):
        keys = j0 + tl.arange(0, BLOCK)
        live = keys <= position
        offsets = base + keys[:, None] * D + dims[None, :]
        mask = live[:, None] & (dims[None, :] < D)
        k = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        if softcap > 0:  # Gemma 2: s -> cap tanh(s / cap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(live, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)  # m starts at -inf: the first block scales the empty sums by 0
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        total = total * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    tl.store(out_ptr + (t * Hq + h) * D + dims, (acc / total).to(out_ptr.dtype.element_ty), mask=dims < D)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ weight [N, K]^T + bias [N] -> [..., N] in x's dtype (fp32 accumulation)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"x must be [..., {weight.shape[1]}], got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        _linear_kernel[grid](x2, weight.contiguous(), bias if bias is not None else y, y, M, N, K,
                             HAS_BIAS=bias is not None, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, UPCAST=_INTERPRETED)
    return y.view(*x.shape[:-1], N)


def attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor, window: int = 0,
              softcap: float = 0.0) -> Tensor:
    """q [N, Hq, D] over one layer's k_cache, v_cache [B, Hkv, S, D] (contiguous, the queries' own keys
    written); query t attends to keys max(0, p - window + 1) .. p, p = positions[t] (window 0: from 0),
    of slot slots[t] ([N] int64, on q's device), scores soft-capped to softcap tanh(s / softcap) where
    softcap > 0. Returns [N, Hq, D] in q's dtype."""
    N, Hq, D = q.shape
    B, Hkv, S, _ = k_cache.shape
    if Hq % Hkv or k_cache.shape[3] != D or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"q {tuple(q.shape)} does not fit contiguous caches {tuple(k_cache.shape)}")
    out = torch.empty_like(q)
    if N:
        _attention_kernel[(N, Hq)](q.contiguous(), k_cache, v_cache, slots, positions, out, Hq, Hkv, S,
                                   1.0 / D ** 0.5, window, float(softcap), D=D, BLOCK_D=triton.next_power_of_2(D),
                                   BLOCK=BLOCK_KV)
    return out
