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

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import is_int, is_real

STREAM_ACCEPT = 1
STREAM_RESIDUAL = 2
STREAM_ENSEMBLE = 3
STREAM_DRAFT = 16  # + model index

_M32 = 0xFFFFFFFF
FP32_TINY = torch.finfo(torch.float32).tiny  # smallest positive normal float32
FP32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; validated on construction (the vocabulary bound of
    stop_token_ids at ``Engine.submit``). Bools are refused for the numeric fields.

    temperature: 0 = greedy, else in [FP32_TINY, FP32_MAX]. top_k: an int >= 0, 0 = off.
    top_p: in [FP32_TINY, 1], 1.0 = off. Logits are tempered and filtered in float32, where a
    positive temperature or top_p below the smallest normal (FP32_TINY, ~1.18e-38) is a subnormal
    or 0 (GPUs flush subnormals to 0): the probabilities turn NaN and the draw silently lands on
    token 0.
    seed: an int in [0, 2**63), or None to draw one at random. max_new_tokens: an int >= 1.
    stop_token_ids: ints >= 0; generation ends after emitting one (it is kept in the output); so does
    the engine's ``eos_ids`` (the EOS and the end-of-turn / end-of-text special tokens) unless
    ignore_eos. stop: a string or strings; the text is cut before the first occurrence.
    min_tokens: an int in [0, max_new_tokens]; the first min_tokens new tokens are never a stop token
    (r is the ensemble over logits in which the stop tokens' are -inf, ``EnsembleSpec.target``), and
    a stop string counts only where it starts after their text.
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
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        t = self.temperature
        if not is_real(t) or not (t == 0 or FP32_TINY <= t <= FP32_MAX):  # NaN fails both
            raise ValueError(f"temperature must be 0 (greedy) or a number in [{FP32_TINY:.4g}, {FP32_MAX:.4g}] "
                             f"(float32's normal range), got {t!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if not is_real(p) or not FP32_TINY <= p <= 1:
            raise ValueError(f"top_p must be a number in [{FP32_TINY:.4g}, 1] (1 = off), got {p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_tokens!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, (Sequence, AbstractSet)) or any(not is_int(i) or i < 0 for i in ids):
            raise ValueError(f"stop_token_ids must be a sequence of ints >= 0, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a sequence of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

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
