"""Fallback runner over any ``AutoModelForCausalLM``, through transformers' own KV cache.

It exists for architectures the native decoder does not implement. It is slower (transformers'
per-call overhead and a dynamic cache) and serves one sequence only (max_batch = 1); it raises
instead of guessing wherever it cannot follow the runner interface.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import CacheOverflowError


class HFRunner:
    """Same interface as ``se_engine.model.Transformer``, for batch 1."""

    max_batch = 1

    def __init__(self, hf_model: nn.Module, *, max_len: int = 2048):
        from transformers import DynamicCache

        self.model = hf_model.eval()
        self.max_len = max_len
        self.vocab_size = hf_model.config.vocab_size
        device = next(hf_model.parameters()).device
        self.lengths = torch.zeros(1, dtype=torch.long, device=device)
        self._cache = DynamicCache(config=hf_model.config)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, num_tokens: Tensor | None = None, last_only: bool = False) -> Tensor:
        """tokens: [1, k] -> fp32 logits [1, k, V] (or [1, 1, V] with last_only)."""
        if tokens.shape[0] != 1:
            raise ValueError(f"HFRunner serves batch 1 only, got {tokens.shape[0]} rows; use runner='native'")
        if num_tokens is not None and int(num_tokens[0]) != tokens.shape[1]:
            raise ValueError("HFRunner does not support padded rows (num_tokens < k)")
        k = tokens.shape[1]
        start = int(self.lengths[0])
        if start + k > self.max_len:
            raise CacheOverflowError(f"cannot append {k} tokens: the sequence holds {start} of max_len={self.max_len}")
        out = self.model(input_ids=tokens, past_key_values=self._cache, use_cache=True,
                         logits_to_keep=1 if last_only else 0)
        self.lengths += k
        return out.logits.float()

    def truncate(self, lengths: Tensor) -> None:
        n = int(lengths[0])
        if not 0 <= n <= int(self.lengths[0]):
            raise ValueError(f"truncate can only shorten the sequence: current {int(self.lengths[0])}, asked {n}")
        removed = int(self.lengths[0]) - n
        if removed:
            self._cache.crop(-removed)  # negative = tokens to remove, in every transformers 5.x
        self.lengths.fill_(n)

    def reset(self) -> None:
        self.truncate(torch.zeros_like(self.lengths))
