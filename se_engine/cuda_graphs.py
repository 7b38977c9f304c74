"""CUDA graphs of a native model's decode and verify forwards.

A forward of b rows with up to w new tokens each runs, eagerly, a few hundred small kernels whose
launches cost more than their work at batch 1. ``GraphedForward`` captures the forward once per
shape bucket (span S, width W) and replays it:

- **Static layout.** The bucket covers cache slots 0 .. S-1 (S: the smallest power of two above the
  highest slot, at most max_batch), W token columns each, densely: N = S * W tokens. Row r's new
  tokens go to columns 0 .. c_r-1 at their positions; every other cell (padding after a short row,
  and every column of a slot outside this forward) is a pad token at position lengths[r] + j, the
  cell's natural place after the slot's committed entries. Attention reads all max_len entries of
  each slot under the causal mask (query at position p sees entries 0 .. p).
- **Why pads are harmless.** A pad writes K, V only past its slot's committed entries and past the
  row's real tokens; no query of a real token sees those entries (they lie after it), and the
  runner's invariant is that entries past a slot's length are garbage until overwritten. Shapes
  whose pads would run past max_len (a slot within W of its capacity) run eagerly.
- **Inputs and output.** Token ids, positions (which are also the query positions) and the indices
  of the rows whose logits are returned live in one static [3, N] int64 buffer, filled with one
  host-to-device copy. The graph ends with the hidden states of those rows, [N, hidden]; the final
  norm and LM head run eagerly on the M rows asked for, so no bucket holds [N, V] logits and pad
  rows cost no head matmul (at V = 151,936 the head is most of a small model's output work).

Forwards wider than ``max_width`` (prefill) run eagerly; so does any shape whose capture fails,
with the reason logged once. ``stats`` counts captures, replays and eager forwards, so a benchmark
can show that graphs are in fact replayed. ``capture=False`` runs the same padded forward without a
graph (on machines without CUDA, where the tests check its layout against the eager forward).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from .packing import PackedBatch

log = logging.getLogger(__name__)


class GraphableModel(Protocol):
    """What a graphed forward needs of its model (``se_engine.model.Transformer``, which imports this
    module: a protocol, not that class, keeps the import one-way)."""
    max_batch: int
    max_len: int
    lengths: list[int]  # cache entries of each slot
    invariant: bool

    @property
    def device(self) -> torch.device: ...

    def hidden_at_logits(self, batch: PackedBatch) -> Tensor:
        """The last hidden states [M, hidden] at ``batch.logit_index``."""
        ...

    def head(self, x: Tensor) -> Tensor:
        """Hidden states [M, hidden] -> fp32 logits [M, V]."""
        ...


class GraphedForward:
    def __init__(self, model: GraphableModel, max_width: int, capture: bool = True):
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {model.device}")
        if max_width < 1:
            raise ValueError(f"max_width must be >= 1, got {max_width}")
        self.model, self.max_width, self.capture = model, max_width, capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.shapes: dict[tuple[int, int], _Shape | None] = {}  # None: its capture failed
        self.logged: set[tuple[int, str]] = set()
        self.stats: Counter[str] = Counter()

    def span(self, rows: Sequence[int]) -> int:
        """Slots 0 .. S-1 covered by the bucket for these rows."""
        return min(1 << max(rows).bit_length(), self.model.max_batch)

    def try_forward(self, rows: Sequence[int], tokens: Sequence[Sequence[int]],
                    num_logits: Sequence[int]) -> Tensor | None:
        """The forward's logits [sum(num_logits), V] from a graph, or None where this call must run
        eagerly (arguments already checked by ``check_forward``; lengths not yet advanced)."""
        width, span = max(len(t) for t in tokens), self.span(rows)
        lengths = self.model.lengths
        if width > self.max_width:
            return self._eager(span, width, f"width > max_width {self.max_width}")
        if any(lengths[r] + width > self.model.max_len for r in range(span)):
            return self._eager(span, width, "a slot is within the width of max_len")
        # Pads everywhere at their natural positions (a row's start is its slot's length), then the
        # real tokens over them; logit rows packed row after row, as the eager forward returns them.
        ids, logit_rows = [0] * (span * width), [0] * (span * width)
        cells = [lengths[r] + j for r in range(span) for j in range(width)]
        at = 0
        for r, row, n in zip(rows, tokens, num_logits):
            ids[r * width:r * width + len(row)] = row
            logit_rows[at:at + n] = range(r * width + len(row) - n, r * width + len(row))
            at += n
        host = torch.tensor([ids, cells, logit_rows])
        key = (span, width)
        if key not in self.shapes:
            self.shapes[key] = self._build(span, width, host)
        shape = self.shapes[key]
        if shape is None:
            return self._eager(span, width, "its capture failed")
        shape.inputs.copy_(host)
        if shape.graph is None:
            self.stats["padded"] += 1
            hidden = shape.run()
        else:
            shape.graph.replay()
            self.stats["replay"] += 1
            hidden = shape.hidden
        return self.model.head(hidden[:at])

    def _eager(self, span: int, width: int, why: str) -> None:
        if (span, why) not in self.logged:  # once per bucket span and reason, whatever the width
            log.info("eager forward for span %d (width %d, and others like it): %s", span, width, why)
            self.logged.add((span, why))
        self.stats["eager"] += 1
        return None

    def _build(self, span: int, width: int, host: Tensor) -> "_Shape | None":
        """The bucket's buffers and, with capture, its graph; None where the capture failed."""
        shape = _Shape(self.model, span, width, host.to(self.model.device))
        if not self.capture:
            return shape
        try:
            # Warm-up on a side stream (cuBLAS workspaces, lazy inits), then capture. Both run with
            # this call's inputs, so the cache entries they write are those the replay writes again.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                shape.run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                shape.hidden = shape.run()
            shape.graph = graph
        except RuntimeError as e:
            log.warning("CUDA graph capture failed for span %d, width %d; it runs eagerly: %s", span, width, e)
            return None
        self.stats["capture"] += 1
        return shape


class _Shape:
    """The static buffers of one (span, width) bucket and the padded forward over them."""

    def __init__(self, model: GraphableModel, span: int, width: int, inputs: Tensor):
        self.model, self.inputs = model, inputs  # [3, N]: token ids, positions, logit rows
        ids, positions, logit_rows = inputs.unbind(0)
        slots = torch.arange(span, device=inputs.device).repeat_interleave(width)
        self.batch = PackedBatch(tokens=ids, slots=slots, positions=positions, pad_index=None,
                                 query_pos=positions.view(span, width), logit_index=logit_rows, lo=0, span=span,
                                 width=width, kv_len=model.max_len, invariant=model.invariant)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: Tensor | None = None  # the graph's output [N, hidden]

    def run(self) -> Tensor:
        """The last layer's hidden states at the logit rows, [N, hidden] (rows past M: padding)."""
        return self.model.hidden_at_logits(self.batch)
