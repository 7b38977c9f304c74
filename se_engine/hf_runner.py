"""Fallback runner over any ``AutoModelForCausalLM``, through transformers' own KV cache.

It exists for architectures the native decoder does not implement. It is slower (transformers'
per-call overhead and a dynamic cache) and serves one sequence only (max_batch = 1, slot 0); it
raises instead of guessing wherever it cannot follow the runner interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import CacheOverflowError


class HFRunner:
    """Same interface as ``se_engine.model.Transformer``, for one slot."""

    max_batch = 1

    def __init__(self, hf_model: nn.Module, *, max_len: int = 2048):
        from transformers import DynamicCache

        self.model = hf_model.eval()
        self.max_len = max_len
        self.vocab_size = hf_model.config.vocab_size
        self.device = next(hf_model.parameters()).device
        self.lengths = [0]
        self.writes = [0]
        self._cache = DynamicCache(config=hf_model.config)

    @torch.inference_mode()
    def forward(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], num_logits: Sequence[int]) -> Tensor:
        """rows == [0]; tokens: [k ids]; returns fp32 logits [num_logits[0], V] of the last tokens."""
        if list(rows) != [0] or len(tokens) != 1:
            raise ValueError(f"HFRunner serves one sequence in slot 0, got rows {list(rows)}; use runner='native'")
        k, n = len(tokens[0]), num_logits[0]
        if not 0 <= n <= k or k < 1:
            raise ValueError(f"need >= 1 token and 0 <= num_logits <= {k}, got {k} tokens and {n} logits")
        if self.lengths[0] + k > self.max_len:
            raise CacheOverflowError(
                f"cannot append {k} tokens: the sequence holds {self.lengths[0]} of max_len={self.max_len}")
        ids = torch.tensor([list(tokens[0])], device=self.device)
        out = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=max(n, 1))
        self.lengths[0] += k
        self.writes[0] += 1
        return out.logits[0, out.logits.shape[1] - n:].float()

    def fork(self, src: int, dst: Sequence[int]) -> None:
        raise ValueError("HFRunner has one slot: there is no other slot to fork into")

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        if list(rows) != [0]:
            raise ValueError(f"HFRunner has slot 0 only, got rows {list(rows)}")
        n = lengths[0]
        if not 0 <= n <= self.lengths[0]:
            raise ValueError(f"truncate can only shorten slot 0: it holds {self.lengths[0]}, asked {n}")
        if n < self.lengths[0]:
            self._cache.crop(n - self.lengths[0])  # negative = tokens to remove, in every transformers 5.x
        self.lengths[0] = n
