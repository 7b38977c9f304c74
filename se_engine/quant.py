"""Weight-only int8 / int4 copies of native models: cheap draft-only proposers.

A drafter (``Engine(..., method="ensemble_sd", drafter=...)``) only has to be cheap and close to the
ensemble: its logits are q, the distribution its drafts are drawn from, and the acceptance test
against r corrects any difference, so the output stays exactly the ensemble's. A batch-1 forward on
a CPU streams every weight once from memory, so fewer weight bytes mean a proportionally faster
draft: a quantized copy of the ensemble's smallest model drafts for the exact models.

int8, symmetric per output channel o, for a weight W [out, in]:
    s_o  = max_i |W_oi| / 127,   Q_oi = round(W_oi / s_o) in [-127, 127]
    y    = (x Q^T) * s  (+ b)
int4, asymmetric per output channel o and group g of GROUP input channels (torch's CPU layout):
    s_og = (max W_og - min W_og) / 15,   Q_oi = round((W_oi - min W_og) / s_og) in [0, 15]
    W_oi ~ (Q_oi - 8) s_og + z_og,   z_og = min W_og + 8 s_og
    y    = x W~^T  (+ b)

torch's CPU kernels for both are GEMVs: faster than a bf16 matmul for a few rows (drafting), far
slower for many (a prompt). Beyond INT8_KERNEL_ROWS / INT4_KERNEL_ROWS rows a layer dequantizes its
weight to the activations' dtype and runs a plain matmul instead; off the CPU it always does, so
there a quantized drafter is slower than the model itself (a GPU wants fused dequantizing kernels).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Transformer

Scheme = Literal["int8", "int4"]
GROUP = 32  # int4 group size: the smallest the kernel takes, the closest to the weights
# Row counts up to which the kernels beat the fallback (measured on the AMX Xeon of our CI:
# int8 0.64 / int4 0.30 ms against bf16 1.1-1.3 ms at 1 row of a 9728 x 896 weight).
INT8_KERNEL_ROWS = 4
INT4_KERNEL_ROWS = 8
# The int8 kernel needs in_features % 16 == 0 beyond one row (it crashes otherwise); we tested
# multiples of 32. The int4 packing needs out_features % 16 == 0: int4 layers pad their outputs.
INT8_IN_MULTIPLE = 32
INT4_OUT_MULTIPLE = 16


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
    """int4 weights in torch's packed CPU layout, with an int8 copy of the codes [out, in] for the
    dequantized path; scale and zero per output channel and group of GROUP inputs (model dtype).
    A forward through the kernel streams half a byte per weight; the layer holds 1.5."""

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
        scale, zero = (t.to(linear.weight.dtype).float() for t in (scales, low + 8 * scales))
        codes = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).view(out_features, -1)
        padded = -out_features % INT4_OUT_MULTIPLE
        # scale_zeros [groups, out (padded), 2]; padded outputs are 0 (code 8, zero 0) and cut off.
        scale_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)
        scale_zeros = F.pad(scale_zeros, (0, 0, 0, padded)).contiguous().to(linear.weight.dtype)
        packed_codes = F.pad(codes, (0, 0, 0, padded), value=8).to(torch.int32)
        self.out_features = out_features
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale_zeros", scale_zeros)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(packed_codes, 1)
                             if w.device.type == "cpu" else None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out] in x's dtype."""
        rows = _rows(x)
        if self.packed is not None and x.device.type == "cpu" and rows <= INT4_KERNEL_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, -1).contiguous(), self.packed, GROUP,
                                                            self.scale_zeros.to(x.dtype))
            y = y[:, :self.out_features].view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self._weight(x.dtype))
        return y if self.bias is None else y + self.bias

    def _weight(self, dtype: torch.dtype) -> Tensor:
        """(Q - 8) s + z, [out, in] in ``dtype``."""
        out_features = self.out_features
        scale, zero = self.scale_zeros[:, :out_features].to(dtype).transpose(0, 1).unbind(-1)  # [out, groups] each
        codes = self.codes.view(out_features, -1, GROUP).to(dtype)
        return ((codes - 8) * scale[..., None] + zero[..., None]).view(out_features, -1)

    def dequantized(self) -> Tensor:
        """The weight this layer applies as fp32 [out, in] (the reference in tests)."""
        return self._weight(torch.float32)


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
