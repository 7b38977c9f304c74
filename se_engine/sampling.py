"""Sampling parameters, per-model logit processing, and counter-based random sampling.

Every random choice is a pure function of (request seed, absolute token position, stream):
reproducible per request, independent of batch composition and of which other tokens were drawn,
and computable the same way inside a fused kernel. Streams keep the different decisions at one
position independent (a model's draft, the acceptance test, the residual, an ensemble sample).

Greedy decoding (temperature 0) is not a separate code path: a greedy distribution is the one-hot
vector of the argmax (ties -> lowest token id), and speculative acceptance with one-hot q and r
reduces exactly to "accept iff the draft is the ensemble's argmax, else emit that argmax".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STREAM_ACCEPT = 1
STREAM_RESIDUAL = 2
STREAM_ENSEMBLE = 3
STREAM_DRAFT = 16  # + model index

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; validated on construction.

    temperature: 0 = greedy. top_k: 0 = off. top_p: 1.0 = off. seed: None draws one at random.
    stop_token_ids: generation ends after emitting one (it is kept in the output); so does the
    engine's ``eos_ids`` (the EOS and the end-of-turn / end-of-text special tokens) unless
    ignore_eos. stop: strings; the text is cut before the first occurrence.
    logprobs: return log r(token) of each emitted token under the ensemble distribution it was
    drawn from (for greedy requests: under the temperature-1, unfiltered ensemble).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or t != t or t < 0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """logits [R, V] -> the distribution a model samples from, fp32 [R, V].

    Greedy (temperature 0): one-hot argmax. Otherwise softmax(logits / T) restricted to the top-k
    tokens and then to the smallest set whose mass reaches top_p (ties at the boundary kept),
    renormalised.
    """
    logits = logits.float()
    if temperature == 0:
        return one_hot_argmax(logits)
    scaled = logits / temperature
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if top_p < 1.0:
        sorted_p, _ = probs.sort(dim=-1, descending=True)
        # Mass strictly before each sorted entry; keep entries whose preceding mass is < top_p.
        before = sorted_p.cumsum(-1) - sorted_p
        threshold = sorted_p.masked_fill(before >= top_p, float("inf")).amin(-1, keepdim=True)
        # Renormalised by a softmax, not by a sum: torch splits one long row's sum across threads,
        # so a sum would round differently for a sequence alone than in a batch.
        probs = scaled.masked_fill(probs < threshold, float("-inf")).softmax(-1)
    return probs


def row_sum(x: Tensor, chunk: int = 1024) -> Tensor:
    """x [..., V] summed over V, keepdim, in an order that depends on V alone: per chunk of ``chunk``
    entries, then over the chunks (torch's own sum of a lone long row runs in another order than
    the same row's sum in a batch)."""
    pad = -x.shape[-1] % chunk
    parts = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, chunk)).sum(-1)
    return parts.sum(-1, keepdim=True)


def one_hot_argmax(scores: Tensor) -> Tensor:
    """fp32 one-hot of the argmax over the last dim; torch.argmax picks the lowest index on ties."""
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche permutation (lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _key(seed: Tensor, position: Tensor, stream: int) -> Tensor:
    h = _mix32((seed & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (position & _M32))
    return _mix32(h ^ stream)


def uniform(seed: Tensor, position: Tensor, stream: int, n: int | None = None) -> Tensor:
    """fp32 uniforms in (0, 1) keyed on (seed, position, stream): [R] or, with n, [R, n] (index = column).

    seed, position: [R] int64. 23 random bits each, so that (bits + 0.5) is exact in fp32 and the
    largest value stays below 1 (with 24 bits it would round up to 1.0).
    """
    h = _key(seed, position, stream)
    if n is not None:
        h = _mix32(h[:, None] ^ torch.arange(n, device=h.device, dtype=torch.long))
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def sample(probs: Tensor, seed: Tensor, position: Tensor, stream: int) -> Tensor:
    """Draws one token per row of probs [R, V] (not necessarily normalised) -> [R] int64.

    Exponential race: token = argmin_v E_v / p_v with E_v = -log u_v, i.e. argmax log p_v - log E_v;
    P(token = v) = p_v / sum(p). Zero-probability tokens never win.
    """
    e = -torch.log(uniform(seed, position, stream, probs.shape[-1]))
    score = torch.where(probs > 0, probs.log() - e.log(), float("-inf"))
    return score.argmax(-1)
