"""The user-facing engine: models + ensemble + method -> generate / stream."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from triton_kernels.verify import Backend, fused_unsupported

from .decode import METHODS, Metrics, SequenceDecoder
from .ensemble import EnsembleSpec
from .runner import LoadedModel, check_same_vocabulary, load_model
from .sampling import SamplingParams

Prompt = str | Sequence[int]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) | "length"
    logprobs: list[float] | None
    metrics: Metrics


@dataclass
class StreamChunk:
    text: str             # new text since the previous chunk
    token_ids: list[int]  # tokens committed in this step
    finish_reason: str | None


class Engine:
    """Generation with one model, a plain ensemble, or a speculative ensemble.

    models: names / paths (see ``se_engine.sources``) or already loaded models, in ensemble order.
    ensemble: an EnsembleSpec over the models (default: equal weights); unused by ``single``.
    method: "single" | "ensemble" | "ensemble_sd" | "se".
    gammas: draft length per model, in model order (default: 4 for the cheapest model, 1 for the rest).
    proposer_order: model indices, first proposes first (default: fewest parameters first).
    sampler: "auto" (the fused Triton kernels on CUDA where they apply, PyTorch otherwise), "torch",
        or "triton" (every verify / sampling step fused; on CPU only under TRITON_INTERPRET=1).
    """

    def __init__(self, models: Sequence[str | LoadedModel], ensemble: EnsembleSpec | None = None,
                 method: Literal["single", "ensemble", "ensemble_sd", "se"] = "se",
                 gammas: Sequence[int] | None = None, *, proposer_order: Sequence[int] | None = None,
                 dtype: torch.dtype | None = None, device: str = "cpu", max_len: int = 2048,
                 runner: Literal["native", "hf"] = "native", sampler: Backend = "auto"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not models:
            raise ValueError("at least one model is needed")
        if sampler not in ("auto", "torch", "triton"):
            raise ValueError(f"sampler must be 'auto', 'torch' or 'triton', got {sampler!r}")
        n = len(models)
        if method == "single" and n != 1:
            raise ValueError(f"method 'single' runs one model, got {n}")
        if method in ("ensemble_sd", "se") and n < 2:
            raise ValueError(f"method {method!r} needs at least two models, got {n}")
        if method == "single":
            ensemble = EnsembleSpec.weighted([1.0])
        elif ensemble is None:
            ensemble = EnsembleSpec.weighted([1.0] * n)
        ensemble.check_num_models(n)
        if sampler == "triton" and (why := fused_unsupported(ensemble, [], n)):
            raise ValueError(f"sampler='triton' cannot run this ensemble: {why}")
        self.models = [m if isinstance(m, LoadedModel) else
                       load_model(m, runner=runner, dtype=dtype, device=device, max_batch=1, max_len=max_len)
                       for m in models]
        check_same_vocabulary(self.models)
        if proposer_order is None:
            proposer_order = sorted(range(n), key=lambda i: self.models[i].num_params)
        if sorted(proposer_order) != list(range(n)):
            raise ValueError(f"proposer_order must be a permutation of 0..{n - 1}, got {list(proposer_order)}")
        if gammas is None:
            gammas = [4 if i == proposer_order[0] else 1 for i in range(n)]
        gammas = list(gammas)
        if len(gammas) != n or any(not isinstance(g, int) or g < 1 for g in gammas):
            raise ValueError(f"gammas must be {n} ints >= 1 (one per model), got {gammas}")
        self.ensemble, self.method, self.gammas, self.order = ensemble, method, gammas, list(proposer_order)
        self.sampler = sampler
        self.tokenizer = self.models[0].tokenizer
        self.max_len = min(m.runner.max_len for m in self.models)

    def _prepare(self, prompt: Prompt, params: SamplingParams) -> tuple[list[int], set[int], int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.models[0].runner.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        need = len(ids) + params.max_new_tokens + max(self.gammas) + 1
        if need > self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} (+ "
                             f"{max(self.gammas) + 1} draft slots) exceeds max_len={self.max_len}")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer.eos_token_id is not None:
            stop_ids.add(self.tokenizer.eos_token_id)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return ids, stop_ids, seed

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yields text as it is committed; the final chunk has a finish_reason. ``self.last_result``
        holds the full GenerationResult once the stream is exhausted."""
        params = params or SamplingParams()
        ids, stop_ids, seed = self._prepare(prompt, params)
        decoder = SequenceDecoder([m.runner for m in self.models], self.ensemble, self.method, self.gammas,
                                  self.order, params, seed, ids, stop_ids, self.sampler)
        start, sent, text = time.perf_counter(), 0, ""
        finish = None
        for new in decoder.run():
            text = self.tokenizer.decode(decoder.seq[len(ids):], skip_special_tokens=True)
            cut = _first_stop(text, params.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
            finish = finish or decoder.finished
            # Hold back text that may still become a stop string, or an incomplete UTF-8 character.
            safe = len(text) if finish else _safe_prefix(text, params.stop)
            if safe > sent or finish:
                yield StreamChunk(text[sent:safe], new, finish)
                sent = safe
            if finish:
                break
        decoder.metrics.wall_s = time.perf_counter() - start
        tokens = decoder.seq[len(ids):]
        self.last_result = GenerationResult(text, tokens, finish, decoder.logprobs[:len(tokens)] if params.logprobs
                                            else None, decoder.metrics)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """One result per prompt (a single prompt is a list of one)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        results = []
        for prompt, p in zip(prompts, params_list):
            for _ in self.stream(prompt, p):
                pass
            results.append(self.last_result)
        return results


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
    for s in stops:
        for k in range(min(len(s) - 1, safe), 0, -1):
            if text[:safe].endswith(s[:k]):
                safe -= k
                break
    return max(safe, 0)
