"""The packed layout of one ragged forward over cache rows, and the host-side check of its arguments.

A leaf module: the native model (``se_engine.model``), its nested early-exit views
(``se_engine.nested``) and its CUDA graphs (``se_engine.cuda_graphs``) all lay forwards out this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CacheOverflowError


@dataclass
class PackedBatch:
    """The new tokens of b cache rows, packed row after row (N tokens in all), and where they go.

    Matmuls run on the N packed tokens; attention alone pads them to [span, width], where the span
    covers the slots lo .. lo + span - 1 (so the cache is read through a view, never gathered).
    """
    tokens: Tensor       # [N] int64
    slots: Tensor        # [N] int64 cache slot of each token
    positions: Tensor    # [N] int64 absolute position of each token in its slot
    pad_index: Tensor | None  # [N] int64 index of each token in the padded [span * width]; None: no padding
    query_pos: Tensor    # [span, width] int64 position of each padded query (0 for slots outside the batch)
    logit_index: Tensor  # [M] int64 packed tokens whose logits are returned
    lo: int
    span: int
    width: int
    kv_len: int          # attention reads cache entries [0, kv_len) of each slot
    invariant: bool = False  # run the batch-invariant kernels (packed, unpadded attention)

    @classmethod
    def build(cls, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int], num_logits: Sequence[int],
              tokens: Sequence[int], device: torch.device, invariant: bool = False) -> "PackedBatch":
        """Lays out ``counts[i]`` tokens of slot ``rows[i]`` at positions starts[i] .. starts[i] + counts[i] - 1
        (arguments already checked); ``tokens``: their ids, flat, or empty where the caller brings hidden
        states instead of ids. invariant: see ``Transformer``."""
        b = len(rows)
        kv_len = max(s + c for s, c in zip(starts, counts))
        lo, width = min(rows), max(counts)
        span = max(rows) - lo + 1
        dense = span == b and list(rows) == sorted(rows) and min(counts) == width
        slots, positions, pad_index, logit_index = [], [], [], []
        query_pos = [0] * (span * width)
        for r, start, c, n in zip(rows, starts, counts, num_logits):
            at, base = len(positions), (r - lo) * width
            logit_index.extend(range(at + c - n, at + c))
            slots.extend([r] * c)
            positions.extend(range(start, start + c))
            pad_index.extend(range(base, base + c))
            query_pos[base:base + width] = range(start, start + width)
        if dense:
            pad_index = []
        fields = [list(tokens), slots, positions, pad_index, query_pos, logit_index]
        # One host-to-device copy for all index tensors.
        packed = torch.tensor([v for f in fields for v in f], dtype=torch.long).to(device)
        flat, slots_t, positions_t, pad_t, query_t, logit_t = packed.split([len(f) for f in fields])
        return cls(tokens=flat, slots=slots_t, positions=positions_t, pad_index=None if dense else pad_t,
                   query_pos=query_t.view(span, width), logit_index=logit_t, lo=lo, span=span,
                   width=width, kv_len=kv_len, invariant=invariant)


def check_forward(rows: Sequence[int], tokens: Sequence[Sequence[int]], num_logits: Sequence[int],
                  lengths: Sequence[int], max_batch: int, max_len: int) -> list[int]:
    """Checks a runner forward's arguments on the host (see ``Transformer.forward``) against the
    slots' ``lengths``; returns each row's start position (its slot's length)."""
    b = len(rows)
    counts = [len(t) for t in tokens]
    if b == 0 or len(counts) != b or len(num_logits) != b:
        raise ValueError(f"forward needs one token list and one logit count per row, got {b} rows, "
                         f"{len(counts)} token lists, {len(num_logits)} counts")
    if len(set(rows)) != b or not all(0 <= r < max_batch for r in rows):
        raise ValueError(f"rows must be distinct slots in [0, {max_batch}), got {list(rows)}")
    if min(counts) < 1 or any(not 0 <= n <= c for n, c in zip(num_logits, counts)):
        raise ValueError(f"every row needs >= 1 token and 0 <= num_logits <= its tokens, got {counts} tokens "
                         f"and {list(num_logits)} logits")
    starts = [lengths[r] for r in rows]
    r = max(range(b), key=lambda i: starts[i] + counts[i])
    if starts[r] + counts[r] > max_len:
        raise CacheOverflowError(f"cannot append {counts[r]} tokens to slot {rows[r]}: it holds {starts[r]} of "
                                 f"max_len={max_len} positions")
    return starts
