"""Batch-invariant bf16 kernels: the CPU's (``csrc/invariant_cpu.cpp``), the GPU's
(``triton_kernels/invariant.py``), and their PyTorch twins.

A kernel is batch-invariant when each output element is computed by the same instructions in the
same order whatever else the call carries: other rows, other queries, padded keys, threads. Then a
token's logits and KV entries are bitwise the same in a 1-token decode, a k + 1-token verify, a
prefill, or beside other sequences, and greedy speculative decoding is token-for-token the plain
ensemble in bf16 too. On this project's CPUs neither oneDNN's bf16 GEMM (its reduction order
changes with the row count for K >= ~1500) nor PyTorch's CPU SDPA (it changes with the number of
keys after the query's causal limit) is invariant.

``linear`` / ``attention`` run the extension (se_engine._kv) on CPU tensors and the Triton kernels
(imported on first use) on CUDA tensors; ``*_reference`` are their fp32 PyTorch twins, which the
tests hold both to within bf16 rounding (the kernels' sums are fp32 in a fixed order, not the twins'
order, so equality is not expected; invariance is tested bitwise). ``rms_norm`` / ``rope`` / ``gated``
fuse the per-token ops around them on the CPU in bf16 (the twins elsewhere): fewer ops, less dispatch.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kv_ops


# The gated MLP's activations, by transformers' hidden_act names.
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def _gpu():
    from triton_kernels import invariant

    return invariant


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ weight [N, K]^T + bias [N] -> [..., N], all bf16 (fp32 sums, rounded once)."""
    if x.is_cuda:
        return _gpu().linear(x, weight, bias)
    return kv_ops.ops("se_inv").linear(x, weight, bias)


def attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor,
              window: int = 0, softcap: float = 0.0) -> Tensor:
    """Causal attention of packed queries over one layer's cache, all bf16.

    q: [N, Hq, D] (rotary applied); k_cache, v_cache: [B, Hkv, S, D] contiguous, with the queries'
    own keys already written; slots, positions: [N] int64 CPU: query t attends to keys
    max(0, p - window + 1) .. p, p = positions[t] (window 0: from 0, no sliding window), of slot
    slots[t] (GQA: query head h reads kv head h // (Hq / Hkv)); on CUDA slots and positions live on
    q's device. softcap > 0: scores s (q . k / sqrt(D)) become softcap tanh(s / softcap) (Gemma 2).
    Returns [N, Hq, D]."""
    if q.is_cuda:
        return _gpu().attention(q, k_cache, v_cache, slots, positions, window, softcap)
    return kv_ops.ops("se_inv").attention(q, k_cache, v_cache, slots, positions, window, softcap)


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    """RMSNorm of x [..., D] in fp32: x rsqrt(mean(x^2) + eps), scaled by weight [D] after rounding to
    x's dtype (Llama) or by 1 + weight before it (Gemma). bf16 on the CPU: one fused op (a row's sum
    in index order) instead of eight; else the twin."""
    if x.dtype == weight.dtype == torch.bfloat16 and not x.is_cuda:
        return kv_ops.ops("se_inv").rms_norm(x, weight, eps, gemma)
    return rms_norm_reference(x, weight, eps, gemma)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x [N, H, D]'s first R dims by cos, sin [N, 1, R] (fp32; R < D: partial
    rotary, the other dims pass through), computed in fp32 and rounded to x's dtype. bf16 on the
    CPU: one fused op, bitwise its twin; else the twin."""
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        return kv_ops.ops("se_inv").rope(x, cos, sin)
    return rope_reference(x, cos, sin)


def gated(x: Tensor, activation: str) -> Tensor:
    """act(gate) * up of x [..., 2I] = gate | up -> [..., I], the activation (a key of ACTIVATIONS)
    rounded to x's dtype before the product, as transformers computes it. bf16 on the CPU: one fused
    op (fp32 inside, exp by the attention kernel's polynomial); else the twin."""
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        return kv_ops.ops("se_inv").gated(x, activation)
    return gated_reference(x, activation)


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The fp32 specification of ``linear``."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor,
                        window: int = 0, softcap: float = 0.0) -> Tensor:
    """The fp32 specification of ``attention`` (one query at a time)."""
    group = q.shape[1] // k_cache.shape[1]
    out = []
    for t, (s, p) in enumerate(zip(slots.tolist(), positions.tolist())):
        first = max(0, p - window + 1) if window else 0
        k = k_cache[s, :, first:p + 1].float().repeat_interleave(group, 0)
        v = v_cache[s, :, first:p + 1].float().repeat_interleave(group, 0)
        scores = q[t].float()[:, None] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [Hq, 1, keys]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        out.append((scores.softmax(-1) @ v)[:, 0])
    return torch.stack(out).to(q.dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    """The specification of ``rms_norm`` (transformers' order of operations)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The specification of ``rope``."""
    rotary = cos.shape[-1]
    xf, passed = x[..., :rotary].float(), x[..., rotary:]
    half = rotary // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return torch.cat([(xf * cos + rotated * sin).to(x.dtype), passed], dim=-1)


def gated_reference(x: Tensor, activation: str) -> Tensor:
    """The specification of ``gated``."""
    gate, up = x.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def has_fast_path() -> bool:
    """Whether this CPU runs the AVX512-BF16 kernels (else portable loops: invariant, but slow)."""
    return kv_ops.ops("se_inv").has_avx512_bf16()
