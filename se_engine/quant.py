"""Weight-only int8 / int4 copies of native models: cheap draft-only proposers.

A drafter (``Engine(..., method="ensemble_sd", drafter=...)``) only has to be cheap and close to the
ensemble: its logits are q, the distribution its drafts are drawn from, and the acceptance test
against r corrects any difference, so the output stays exactly the ensemble's. A batch-1 forward on
a CPU streams every weight once from memory, so fewer weight bytes mean a proportionally faster
draft: a quantized copy of the ensemble's smallest model drafts for the exact models.

int8, symmetric per output channel o, for a weight W [out, in]:
    s_o  = max_i |W_oi| / 127,   Q_oi = round(W_oi / s_o) in [-127, 127]
    y    = (x Q^T) * s  (+ b)
int4, asymmetric per output channel o and group g of GROUP input channels:
    s_og = (max W_og - min W_og) / 15,   Q_oi = round((W_oi - min W_og) / s_og) in [0, 15]
    W_oi ~ (Q_oi - 8) s_og + z_og,   z_og = min W_og + 8 s_og
    y    = x W~^T  (+ b), the kernel rounding each group of x to int8 first, as llama.cpp does

int8 runs torch's CPU kernel, int4 (bf16 activations) the extension's ``se_q::int4_linear``
(csrc/quant_cpu.cpp), which streams the packed codes once per 4 rows: faster than a bf16 matmul for a
few rows (drafting), slower for many (a prompt). Beyond INT8_KERNEL_ROWS / INT4_KERNEL_ROWS rows, in
other dtypes and off the CPU a layer dequantizes its weight to the activations' dtype and runs a
plain matmul instead, so on a GPU a quantized drafter is slower than the model itself (a GPU wants
fused dequantizing kernels).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kv_ops
from .model import Transformer

Scheme = Literal["int8", "int4"]
GROUP = 32  # int4 group size (the kernel's)
BLOCK = 4 * GROUP  # inputs per 64-byte block of packed int4 codes; layers pad their inputs to whole blocks
# Row counts up to which the kernels beat the fallback (int8, on an AMX Xeon: 0.64 ms against bf16's
# 1.1-1.3 at 1 row of a 9728 x 896 weight; int4, on an AMD EPYC: 0.15 ms against 2.6 for dequantizing
# and a matmul at 1 row, 2.0 against 3.3 at 16 rows).
INT8_KERNEL_ROWS = 4
INT4_KERNEL_ROWS = 16
# The int8 kernel needs in_features % 16 == 0 beyond one row (it crashes otherwise); we tested
# multiples of 32.
INT8_IN_MULTIPLE = 32


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


class Int8Linear(nn.Module):
    """int8 weights [out, in] and one scale per output channel (model dtype)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        exact = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        # The kernel takes the scales in the model's dtype: round them up there, so that no |W / s|
        # exceeds 127 and every element is within half a step of W.
        scales = exact.to(linear.weight.dtype)
        scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
        self.register_buffer("weight", torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out] in x's dtype."""
        rows = _rows(x)
        if x.device.type == "cpu" and rows <= INT8_KERNEL_ROWS and x.shape[-1] % INT8_IN_MULTIPLE == 0:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), self.weight,
                                                   self.scales.to(x.dtype))
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> Tensor:
        """The weight this layer applies, Q s, as fp32 [out, in] (the reference in tests)."""
        return self.weight.float() * self.scales.float()[:, None]


class Int4Linear(nn.Module):
    """int4 codes packed two to a byte [out, ~in / 2] (csrc/quant_cpu.cpp's layout: ``pack_int4``), and
    scale and zero per output channel and group of GROUP inputs [out, 2, ~in / GROUP] (model dtype).
    A forward through the kernel streams 0.625 bytes per weight, which is all the layer holds."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        if in_features % GROUP:
            raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {in_features}")
        groups = w.view(out_features, in_features // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        # The layer applies scale and zero rounded to the model's dtype: the codes are fitted to those.
        scale, zero = (t.to(linear.weight.dtype) for t in (scales, low + 8 * scales))
        codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        self.in_features = in_features
        self.register_buffer("packed", pack_int4(codes.view(out_features, -1).to(torch.uint8)))
        # [out, 2, groups of whole blocks]: padded groups have scale and zero 0.
        self.register_buffer("scale_zero", F.pad(torch.stack([scale, zero], dim=1), (0, -in_features % BLOCK // GROUP)))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out] in x's dtype."""
        cpu_bf16 = x.device.type == "cpu" and x.dtype == self.scale_zero.dtype == torch.bfloat16
        if cpu_bf16 and _rows(x) <= INT4_KERNEL_ROWS:
            return kv_ops.ops("se_q").int4_linear(x, self.packed, self.scale_zero, self.bias)
        weight = kv_ops.ops("se_q").int4_dequantize(self.packed, self.scale_zero, self.in_features) if cpu_bf16 \
            else self._weight(x.dtype)
        y = F.linear(x, weight)
        return y if self.bias is None else y + self.bias

    def _weight(self, dtype: torch.dtype) -> Tensor:
        """(Q - 8) s + z, [out, in] in ``dtype``."""
        out_features, groups = self.packed.shape[0], self.in_features // GROUP
        scale, zero = self.scale_zero[..., :groups].to(dtype).unbind(1)  # [out, groups] each
        codes = unpack_int4(self.packed, self.in_features).view(out_features, -1, GROUP).to(dtype)
        return ((codes - 8) * scale[..., None] + zero[..., None]).view(out_features, -1)

    def dequantized(self) -> Tensor:
        """The weight this layer applies as fp32 [out, in] (the reference in tests)."""
        return self._weight(torch.float32)


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes [N, K] in [0, 15] -> [N, 64 ceil(K / BLOCK)], csrc/quant_cpu.cpp's layout: byte j of
    a block holds its input j in the low nibble and input 64 + j in the high one (padding: code 8)."""
    n, k = codes.shape
    blocks = F.pad(codes, (0, -k % BLOCK), value=8).view(n, -1, 2, BLOCK // 2)
    return (blocks[:, :, 0] | blocks[:, :, 1] << 4).view(n, -1)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """The inverse of ``pack_int4``: [N, 64 blocks] -> uint8 codes [N, in_features]."""
    blocks = packed.view(packed.shape[0], -1, 1, BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).flatten(1)[:, :in_features]


LAYERS: dict[Scheme, type[Int8Linear] | type[Int4Linear]] = {"int8": Int8Linear, "int4": Int4Linear}


def quantize(model: Transformer, scheme: Scheme) -> Transformer:
    """Replaces every linear layer of ``model`` (attention, MLP, LM head; not the embedding table)
    by its ``scheme`` version, in place; returns the model."""
    if scheme not in LAYERS:
        raise ValueError(f"scheme must be one of {sorted(LAYERS)}, got {scheme!r}")
    layer = LAYERS[scheme]
    for block in model.layers:
        block.attention.wqkv = layer(block.attention.wqkv)
        block.attention.wo = layer(block.attention.wo)
        block.feed_forward.w13 = layer(block.feed_forward.w13)
        block.feed_forward.w2 = layer(block.feed_forward.w2)
    model.output = layer(model.output)
    model.graphs = None  # graphs captured before would replay the replaced layers
    return model
