"""Ensemble specifications and the target distribution r they define.

Semantics of the sampling settings (temperature T, top-k, top-p), fixed here and in the README:
  * weighted:  r = sum_k lambda_k * process(l_k): each model's logits are tempered and filtered
               first, then the probabilities are mixed.
  * linear:    z = sum_k c_k * l_k on raw logits (contrastive decoding: l_expert - alpha * l_amateur),
               then r = process(z): T / top-k / top-p act on the combined logits.
  * custom:    on="logits": z = fn(logits) then r = process(z), as for linear;
               on="probs":  r = normalise(fn([process(l_k)])), as for weighted.
Greedy (T = 0): r is the one-hot argmax of the T = 1, unfiltered ensemble (the mixture for
weighted / custom-probs, z for linear / custom-logits); ties go to the lowest token id.
Suppressed tokens (``suppress``, a request's stop tokens before its min_tokens) get logit -inf where
the filters act (each model's logits for weighted / custom-probs, z for linear / custom-logits),
before temperature, top-k and top-p; r gives them probability 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .sampling import one_hot_argmax, process_logits, row_sum

EnsembleFn = Callable[[list[Tensor]], Tensor]


@dataclass(frozen=True)
class EnsembleSpec:
    kind: Literal["weighted", "linear", "custom"]
    coefficients: tuple[float, ...] = ()  # weighted: lambdas summing to 1; linear: c_k
    fn: EnsembleFn | None = None
    on: Literal["logits", "probs"] = "logits"
    num_models: int = 0

    @classmethod
    def weighted(cls, weights: Sequence[float]) -> "EnsembleSpec":
        """Mixture of probabilities. Weights must be finite and >= 0, not all zero; they are
        normalised to sum to 1 (so [1, 1] means 0.5 / 0.5)."""
        w = _floats(weights, "weights")
        if any(x < 0 for x in w):
            raise ValueError(f"weights must be >= 0, got {list(w)}")
        total = sum(w)
        if total <= 0:
            raise ValueError(f"weights must not all be zero, got {list(w)}")
        return cls("weighted", tuple(x / total for x in w), num_models=len(w))

    @classmethod
    def contrastive(cls, alpha: float) -> "EnsembleSpec":
        """l_expert - alpha * l_amateur over exactly two models (expert first), alpha in [0, 1]."""
        (a,) = _floats([alpha], "alpha")
        if not 0 <= a <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        return cls("linear", (1.0, -a), num_models=2)

    @classmethod
    def linear(cls, coefficients: Sequence[float]) -> "EnsembleSpec":
        """z = sum_k c_k * l_k on raw logits; finite coefficients, not all zero."""
        c = _floats(coefficients, "coefficients")
        if not any(c):
            raise ValueError(f"coefficients must not all be zero, got {list(c)}")
        return cls("linear", c, num_models=len(c))

    @classmethod
    def custom(cls, fn: EnsembleFn, num_models: int, on: Literal["logits", "probs"] = "logits") -> "EnsembleSpec":
        """A Python callable on the per-model [R, V] tensors (raw logits, or processed probabilities),
        returning [R, V] combined logits (on="logits") or non-negative weights (on="probs")."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if on not in ("logits", "probs"):
            raise ValueError(f"on must be 'logits' or 'probs', got {on!r}")
        if num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}")
        return cls("custom", fn=fn, on=on, num_models=num_models)

    def with_drafter(self) -> "EnsembleSpec":
        """The same target r over n + 1 logits tensors, the last (a draft-only proposer's) with weight 0:
        verify then takes the drafter's logits as the q of its drafts. Adding a zero term changes no
        value of r (the Triton kernels take the extra model like a member)."""
        if self.kind == "custom":
            fn = self.fn
            return replace(self, fn=lambda xs: fn(xs[:-1]), num_models=self.num_models + 1)
        return replace(self, coefficients=self.coefficients + (0.0,), num_models=self.num_models + 1)

    def check_num_models(self, n: int) -> None:
        if self.num_models != n:
            raise ValueError(f"the ensemble is defined over {self.num_models} models but {n} were given")

    def target(self, logits: list[Tensor], temperature: float, top_k: int, top_p: float,
               suppress: Tensor | None = None) -> Tensor:
        """Per-model logits, n x [R, V] -> the ensemble distribution r, fp32 [R, V].
        suppress: [R, V] bool, tokens r must not emit (module docstring), or None."""
        greedy = temperature == 0
        t = 1.0 if greedy else temperature
        if self.kind == "linear" or (self.kind == "custom" and self.on == "logits"):
            z = _suppressed(self._combine_logits(logits), suppress)
            return one_hot_argmax(z) if greedy else process_logits(z, t, top_k, top_p)
        if greedy:  # the mixture of plain softmaxes, then its argmax
            top_k, top_p = 0, 1.0
        probs = [process_logits(_suppressed(x.float(), suppress), t, top_k, top_p) for x in logits]
        if self.kind == "weighted":
            mix = sum(w * p for w, p in zip(self.coefficients, probs))
        else:
            mix = self._checked(self.fn(probs), logits[0], "probabilities")
            if suppress is not None:
                mix = mix.masked_fill(suppress, 0.0)
            total = row_sum(mix)
            if bool((mix < 0).any()) or not bool((total > 0).all()):
                raise ValueError("custom ensemble returned negative weights or an all-zero row")
            mix = mix / total
        return one_hot_argmax(mix) if greedy else mix

    def log_target(self, logits: list[Tensor], temperature: float, top_k: int, top_p: float,
                   suppress: Tensor | None = None) -> Tensor:
        """log r for reporting logprobs; greedy requests report the T = 1 unfiltered ensemble."""
        if temperature == 0:
            return self.target(logits, 1.0, 0, 1.0, suppress).log()
        return self.target(logits, temperature, top_k, top_p, suppress).log()

    def _combine_logits(self, logits: list[Tensor]) -> Tensor:
        if self.kind == "linear":
            return sum(c * x.float() for c, x in zip(self.coefficients, logits))
        return self._checked(self.fn([x.float() for x in logits]), logits[0], "logits")

    @staticmethod
    def _checked(out, like: Tensor, what: str) -> Tensor:
        if not isinstance(out, Tensor) or out.shape != like.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"custom ensemble must return {what} of shape {tuple(like.shape)}, got {shape}")
        out = out.float()
        if bool(torch.isnan(out).any()):
            raise ValueError(f"custom ensemble returned NaN {what}")
        return out


def _suppressed(logits: Tensor, suppress: Tensor | None) -> Tensor:
    return logits if suppress is None else logits.masked_fill(suppress, float("-inf"))


def _floats(values: Sequence[float], name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers, got {values!r}") from e
    if not out:
        raise ValueError(f"{name} must not be empty")
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {list(out)}")
    return out
