"""Nested early-exit draft proposer (S2D-style): sub-models of one loaded native Transformer.

A ``NestedDrafter`` views the first d layers of a ``Transformer``, for each of a few depths
d_0 < d_1 < ... < d_last, as a model of its own: the hidden state after layer d_i, put through the
model's final norm and LM head. It is a runner (the interface of ``se_engine.runner``) that the
scheduler drives as a draft-only proposer (``Engine(..., drafter=...)``): for itself as the target
that is self-speculation, for an ensemble a member's shallow view proposing for all of them.

Adaptive depth. A forward runs every row through layers [0, d_0); a row exits at depth d_i when the
top probability (softmax at temperature 1) of d_i's logits at its last token reaches
``thresholds[i]``, else it continues from its hidden state to d_{i+1}; the last depth always exits.
The logits returned for a row are those of its exit depth: the scheduler draws the draft from them
and uses them as q in the acceptance test, so verification is exact whatever the exits. The exit
decision depends only on the drafter's own outputs for the prefix.

Deferred KV. The drafter has its own KV cache for layers [0, d_last) (weights shared, not the
cache). A token that exits at d_i has no K, V in layers >= d_i yet; its hidden state there is kept
(``hidden``), and the next time a row of its slot runs a deeper layer, the deferred tokens run it too,
packed in front of the new tokens, from their kept states. So every KV entry attention reads is the
one the full model computes for that prefix. Tokens only run past d_i after every earlier token of
their slot has, so the depth reached is non-increasing along a slot and the tokens that lack depth
d_i are a suffix: ``filled[i][s]`` tokens of slot s have reached d_i, and
``lengths[s] == filled[0][s] >= filled[1][s] >= ...``. Rollback shortens every ``filled[i]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor

from . import kv_ops
from .model import Transformer
from .packing import PackedBatch, check_forward


class NestedDrafter:
    """Early-exit views of ``model`` at ``depths`` as one draft runner.

    depths: strictly increasing layer counts in [1, model's layers], e.g. (6, 12, 18, 24) for 24
    layers. thresholds: one per depth but the last (which always exits), each >= 0: a row exits at
    depth i when its top probability is >= thresholds[i] (0: always exit there; above 1: never).
    max_batch, max_len: cache slots and capacity (default: the model's; at most its max_len).
    ``exits[i]`` counts the rows that exited at depth i.
    """

    def __init__(self, model: Transformer, depths: Sequence[int], thresholds: Sequence[float], *,
                 max_batch: int | None = None, max_len: int | None = None):
        if not isinstance(model, Transformer):
            raise TypeError(f"nested views need a native Transformer (runner='native'), got {type(model).__name__}")
        depths, thresholds = list(depths), list(thresholds)
        layers = model.cfg.num_layers
        if (not depths or any(not isinstance(d, int) for d in depths) or depths != sorted(set(depths))
                or depths[0] < 1 or depths[-1] > layers):
            raise ValueError(f"depths must be strictly increasing ints in [1, {layers}], got {depths}")
        if len(thresholds) != len(depths) - 1:
            raise ValueError(f"{len(depths)} depths need {len(depths) - 1} thresholds (the last depth always "
                             f"exits), got {len(thresholds)}")
        if any(not isinstance(t, (int, float)) or math.isnan(t) or t < 0 for t in thresholds):
            raise ValueError(f"thresholds must be numbers >= 0, got {thresholds}")
        max_batch = model.max_batch if max_batch is None else max_batch
        max_len = model.max_len if max_len is None else max_len
        if not 1 <= max_len <= model.max_len or max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 and max_len in [1, {model.max_len}] (the model's rotary "
                             f"tables), got {max_batch} and {max_len}")
        self.model, self.depths, self.thresholds = model, depths, [float(t) for t in thresholds]
        self.max_batch, self.max_len = max_batch, max_len
        self.vocab_size, self.device = model.vocab_size, model.device
        cfg, dtype, device = model.cfg, model.k_cache.dtype, model.device
        cache_shape = (depths[-1], max_batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(cache_shape, dtype=dtype, device=device)
        self.hidden = torch.zeros(max_batch, max_len, cfg.hidden_size, dtype=dtype, device=device)
        self.filled = [[0] * max_batch for _ in depths]
        self.writes = [0] * max_batch  # per slot, as ``Transformer.writes``
        self.exits = [0] * len(depths)

    @property
    def lengths(self) -> list[int]:
        return self.filled[0]

    @torch.inference_mode()
    def forward(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], num_logits: Sequence[int]) -> Tensor:
        """Appends ``tokens[i]`` to slot ``rows[i]`` as ``Transformer.forward`` does; returns fp32 logits
        [sum(num_logits), V], row after row, each row's from the depth it exited at (a row without
        logits exits at the first depth)."""
        starts = check_forward(rows, tokens, num_logits, self.lengths, self.max_batch, self.max_len)
        model, device = self.model, self.device
        ends = [s + len(t) for s, t in zip(starts, tokens)]
        for r in rows:
            self.writes[r] += 1
        out_at = [0, *accumulate(num_logits)]  # row j's logits go to out[out_at[j]:out_at[j + 1]]
        out = torch.empty(out_at[-1], self.vocab_size, device=device)
        # x: [tokens of the active rows, hidden], row after row; row j's span is positions firsts .. ends[j] - 1.
        x = model.embed(torch.tensor([t for row in tokens for t in row], device=device))
        active, firsts = list(range(len(rows))), starts
        for i, depth in enumerate(self.depths):
            # Deferred tokens that stopped at the previous depth join their row here, in front.
            joined = [self.filled[i][rows[j]] for j in active]
            if joined != firsts:
                sizes = [ends[j] - f for j, f in zip(active, firsts)]
                pieces = []
                for j, new_first, first, row_x in zip(active, joined, firsts, x.split(sizes)):
                    pieces += [self.hidden[rows[j], new_first:first], row_x]
                x = torch.cat(pieces)
            firsts = joined
            sizes = [ends[j] - f for j, f in zip(active, firsts)]
            batch = PackedBatch.build([rows[j] for j in active], firsts, sizes, [num_logits[j] for j in active],
                                      (), device, model.invariant)
            x = model.run_layers(x, batch, range(self.depths[i - 1] if i else 0, depth), self.k_cache, self.v_cache)
            logits = model.head(x[batch.logit_index])
            last = i == len(self.depths) - 1
            # One read-back per depth: the exit decision is the host's.
            top = [] if last else logits.softmax(-1).amax(-1).tolist()
            keep, keep_index, at, logit_at = [], [], 0, 0
            out_dst, out_src, kept_x, kept_slot, kept_pos = [], [], [], [], []  # the exiting rows, gathered
            for j, first, size in zip(active, firsts, sizes):
                n = num_logits[j]
                if not last and n and top[logit_at + n - 1] < self.thresholds[i]:
                    keep.append(j)
                    keep_index.extend(range(at, at + size))
                else:
                    out_dst.extend(range(out_at[j], out_at[j + 1]))
                    out_src.extend(range(logit_at, logit_at + n))
                    if not last:  # they will resume from these hidden states
                        kept_x.extend(range(at, at + size))
                        kept_slot.extend([rows[j]] * size)
                        kept_pos.extend(range(first, ends[j]))
                    for k in range(i + 1):
                        self.filled[k][rows[j]] = ends[j]
                    self.exits[i] += 1
                at, logit_at = at + size, logit_at + n
            # One copy each for the exiting rows' logits and hidden states.
            fields = [out_dst, out_src, kept_x, kept_slot, kept_pos]
            index = torch.tensor([v for f in fields for v in f], dtype=torch.long, device=device)
            out_dst_t, out_src_t, x_t, slot_t, pos_t = index.split([len(f) for f in fields])
            out[out_dst_t] = logits[out_src_t]
            self.hidden[slot_t, pos_t] = x[x_t]
            if not keep:
                break
            active, firsts = keep, [f for j, f in zip(active, firsts) if j in keep]
            x = x[torch.tensor(keep_index, device=device)]
        return out

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Rolls slots back to ``lengths`` (each <= its current length), at every depth: O(1)."""
        for r, n in zip(rows, lengths, strict=True):
            if not 0 <= n <= self.lengths[r]:
                raise ValueError(f"truncate can only shorten slot {r}: it holds {self.lengths[r]}, asked {n}")
        for r, n in zip(rows, lengths):
            for filled in self.filled:
                filled[r] = min(filled[r], n)

    def fork(self, src: int, dst: Sequence[int]) -> None:
        """Copies slot ``src``'s cache entries, kept hidden states and depths to the slots ``dst``."""
        n, deferred = self.lengths[src], self.filled[-1][src]
        kv_ops.fork(self.k_cache, self.v_cache, src, list(dst), n)
        for r in dst:
            self.writes[r] += 1
            self.hidden[r, deferred:n] = self.hidden[src, deferred:n]
            for filled in self.filled:
                filled[r] = filled[src]
