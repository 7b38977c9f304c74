"""The user-facing engine: models + ensemble + method -> generate / stream, or submit / step."""

from __future__ import annotations

import random
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from tqdm import tqdm

from . import decode
from .checks import is_int, is_real
from .decode import Scheduler, Target
from .ensemble import EnsembleSpec
from .errors import VocabularyMismatchError
from .gamma import MAX_GAMMA, AutoGammas, DraftLengths, FixedGammas, measure_costs
from .methods import METHODS, POLICIES
from .metrics import Metrics
from .model import Transformer
from .runner import LoadedModel, Runner, check_load_args, check_same_vocabulary, load_model
from .sampling import SamplingParams
from .sources import check_model
from .token_text import encode_text
from .verify import Backend, fused_unsupported

Prompt = str | Sequence[int]
TargetArg = tuple[Sequence[int], EnsembleSpec | None]  # model indices, the ensemble over them (None: equal weights)
# Widest forward replayed from a CUDA graph: a verify of the longest proposal plus the catch-up of a
# model that sat out the previous one. Prefill is wider and runs eagerly.
GRAPH_MAX_WIDTH = 2 * (MAX_GAMMA + 1)
DEFAULT_TARGET = "default"  # the one target of an engine built without ``targets``
# Special tokens that end a generation besides the tokenizer's EOS, where the vocabulary has them:
# a chat model ends a turn with one and a document with another (Qwen2.5: EOS <|im_end|>, and
# <|endoftext|>), and a GGUF conversion carries no generation config listing both (llama.cpp matches
# these names too).
END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) | "length"
    logprobs: list[float] | None
    metrics: Metrics


@dataclass
class RequestOutput:
    """What one tick produced for one request."""
    request_id: int
    text: str             # new text since this request's previous output
    token_ids: list[int]  # tokens committed in this tick
    finish_reason: str | None
    result: GenerationResult | None = None  # the whole generation, on the request's last output


@dataclass
class _Request:
    seq: decode.Sequence
    stop: tuple[str, ...]
    submitted: float
    sent: int = 0  # characters of text already handed out
    stop_from: int | None = None  # where a stop string may start: past the text of the first min_tokens


class Engine:
    """Generation with one model, a plain ensemble, or a speculative ensemble, over a batch of requests.

    models: names / paths (see ``se_engine.sources``) or already loaded models, in ensemble order.
    ensemble: an EnsembleSpec over the models (default: equal weights); unused by ``single``.
    method: "single" | "ensemble" | "ensemble_sd" | "se" ("ensemble_sd" with one model needs a drafter).
    gammas: draft length per model, in model order, each in [1, MAX_GAMMA] (default: 4 for the
        cheapest model, 1 for the rest); or "auto": chosen per proposal from the models' forward
        costs, measured here at start-up, and each sequence's acceptance rates (``se_engine.gamma``);
        or an ``AutoGammas`` with given costs.
    confidence_threshold: a proposal ends early after a draft whose proposer's top probability
        (softmax of its logits) is below this; the gammas are then caps. 0 never ends one early.
        Exact either way (``se_engine.decode``).
    proposer_order: model indices, first proposes first (default: fewest parameters first).
    drafter: a draft-only proposer outside the ensemble (method "ensemble_sd", one or more models): any
        runner over the models' vocabulary: a quantized copy of the smallest model
        (``load_model(name, quantize="int4").runner``, ``se_engine.quant``), or a ``NestedDrafter``
        (early-exit views of a loaded model; of the only model: self-speculation). It is runner
        index n (after the n models) in ``gammas`` (then n + 1 entries, default 4 for the drafter)
        and in the per-model metrics.
    targets: multi-target serving (method "ensemble_sd", no ``ensemble``): name -> (model indices,
        EnsembleSpec over those models in that order, or None for equal weights). Every request names
        one (``submit(..., target=name)``); one proposer drafts for all: the drafter, or else the
        first model of ``proposer_order`` (a member of some targets, outside others).
    max_batch: sequences decoded at once (cache slots per model; more requests wait in FIFO order).
        Default: 8 for models loaded here (1 with runner="hf"), else what the loaded models hold
        (at most that).
    max_len: cache capacity per sequence (prompt + new tokens + draft slots), for models loaded here;
        so are runner ("native" or "hf"), dtype (default: bfloat16) and device.
    sampler: "auto" (the fused Triton kernels on CUDA where they apply, PyTorch otherwise), "torch",
        or "triton" (every verify / sampling step fused; on CPU only under TRITON_INTERPRET=1).
    cuda_graphs: replay the models' decode and verify forwards (up to GRAPH_MAX_WIDTH tokens per
        row) from CUDA graphs, captured per shape on first use. None: for every native model on
        CUDA; True: the same, refused unless every model (and the drafter) is one; False: eager. It
        is a setting of the loaded models: an engine built later on the same models sets it again
        (None too), and the engines share the last setting.
    batch_invariant: for models loaded here, bf16 on the CPU through the batch-invariant kernels
        (``se_engine.invariant_ops``), so that greedy ``se`` / ``ensemble_sd`` emit the ensemble's
        tokens exactly and a seeded request the same tokens whatever else is in the batch. False:
        torch's kernels (faster prefill; results then depend on the batch's shape).
    prefix_cache: a finished request's slot keeps its cache entries, and a later request whose
        prompt shares a prefix with its tokens takes the slot over and prefills only the rest
        (``se_engine.prefix_cache``, docs/prefix_cache.md). It uses idle slots only. Exact wherever
        the forward is batch-invariant; with torch's kernels the reused entries differ from a
        prefill's by rounding, as a batch's shape already makes them.

    Every argument is checked before any model loads, but for what only the loaded models tell
    (their vocabularies, sizes and slots). ``submit`` checks each request, so that a request the
    engine cannot serve never joins a batch.

    ``generate`` and ``stream`` serve their own prompts; ``submit`` / ``step`` / ``abort`` let a
    caller (a server) feed requests in and out between ticks (continuous batching).
    """

    def __init__(self, models: Sequence[str | LoadedModel], ensemble: EnsembleSpec | None = None,
                 method: Literal["single", "ensemble", "ensemble_sd", "se"] = "se",
                 gammas: Sequence[int] | Literal["auto"] | AutoGammas | None = None, *,
                 confidence_threshold: float = 0.0, proposer_order: Sequence[int] | None = None,
                 max_batch: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", max_len: int = 2048, runner: Literal["native", "hf"] = "native",
                 sampler: Backend = "auto", drafter: Runner | None = None,
                 targets: Mapping[str, TargetArg] | None = None, cuda_graphs: bool | None = None,
                 batch_invariant: bool = True, prefix_cache: bool = True):
        # Every check the arguments allow comes before anything loads (loading takes minutes and
        # gigabytes); the ones that need the loaded models follow the loading.
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(models, str) or not isinstance(models, Sequence) or not models:
            raise ValueError(f"models must be a non-empty sequence of names / paths or LoadedModels, got {models!r}")
        if sampler not in get_args(Backend):
            raise ValueError(f"sampler must be one of {get_args(Backend)}, got {sampler!r}")
        if not is_real(confidence_threshold) or not 0 <= confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must be a number in [0, 1], got {confidence_threshold!r}")
        if max_batch is not None and (not is_int(max_batch) or max_batch < 1):
            raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        if drafter is not None and method != "ensemble_sd":
            raise ValueError(f"a drafter proposes for method 'ensemble_sd', got method {method!r}")
        if drafter is not None and not isinstance(drafter, Runner):
            raise ValueError(f"drafter must be a runner (load_model(...).runner, a NestedDrafter), got {drafter!r}")
        load_batch = max_batch or (1 if runner == "hf" else 8)
        _check_loading([m for m in models if not isinstance(m, LoadedModel)], runner=runner, dtype=dtype,
                       device=device, max_batch=load_batch, max_len=max_len, cuda_graphs=cuda_graphs,
                       batch_invariant=batch_invariant)
        n = len(models)
        entries = _checked_entries(n, ensemble, method, targets, drafter is not None)
        if proposer_order is not None:
            proposer_order = _checked_order(proposer_order, n)
        # The first proposer, where the arguments name it; else the cheapest model, known once loaded.
        proposer = n if drafter is not None else (proposer_order[0] if proposer_order is not None else None)
        _check_targets(entries, method, sampler, proposer)
        runs = n + (drafter is not None)  # runners: the models, then the drafter
        draft_lengths = _checked_gammas(gammas, runs, method, drafter is not None)

        self.models = [m if isinstance(m, LoadedModel) else
                       load_model(m, runner=runner, dtype=dtype, device=device, max_batch=load_batch,
                                  max_len=max_len, batch_invariant=batch_invariant) for m in models]
        self.vocab_size = check_same_vocabulary(self.models)  # the models' shared vocabulary
        runners = [m.runner for m in self.models]
        if drafter is not None and drafter.vocab_size < self.vocab_size:
            raise VocabularyMismatchError(f"the drafter has {drafter.vocab_size} output logits, the models' "
                                          f"shared vocabulary {self.vocab_size}")
        all_runners = runners + ([drafter] if drafter is not None else [])
        if proposer_order is None:
            proposer_order = sorted(range(n), key=lambda i: self.models[i].num_params)
        order = [n] * (drafter is not None) + list(proposer_order)  # the drafter proposes first
        if proposer is None:
            _check_targets(entries, method, sampler, order[0])
        self.targets = {name: _target(ms, spec, order, method) for name, (ms, spec) in entries.items()}
        _set_cuda_graphs(all_runners, cuda_graphs)  # before gammas="auto" measures the forwards' costs
        if draft_lengths is None:  # the default
            draft_lengths = FixedGammas([4 if i == order[0] else 1 for i in range(runs)])
        elif draft_lengths == "auto":
            draft_lengths = AutoGammas(measure_costs(all_runners, slot=0, max_k=MAX_GAMMA + 1))
        self.ensemble = None if targets is not None else entries[DEFAULT_TARGET][1]
        self.method, self.order, self.drafter = method, order, drafter
        self.gammas = draft_lengths.gammas if isinstance(draft_lengths, FixedGammas) else "auto"
        self.tokenizer = self.models[0].tokenizer
        self.eos_ids = _end_of_generation_ids(self.tokenizer)
        self.max_len = min(r.max_len for r in all_runners)
        self.scheduler = Scheduler(all_runners, POLICIES[method], draft_lengths, self.order, self.vocab_size,
                                   sampler=sampler, confidence_threshold=confidence_threshold, max_batch=max_batch,
                                   prefix_cache=prefix_cache)
        self._requests: dict[int, _Request] = {}
        self._next_id = 0

    def refresh_costs(self) -> None:
        """Measures the forward costs of ``gammas="auto"`` again (a few seconds: each model over 1 and
        MAX_GAMMA + 1 tokens), e.g. after the machine's load changed. Only between generations: a
        seeded request emits the same tokens for the same costs, so costs never change under it."""
        self._check_idle()
        if not isinstance(self.scheduler.draft_lengths, AutoGammas):
            raise ValueError(f"this engine's gammas are fixed ({self.gammas}); costs matter only for gammas='auto'")
        self.scheduler.draft_lengths.costs = measure_costs(self.scheduler.runners, slot=0, max_k=MAX_GAMMA + 1)

    @property
    def runner_names(self) -> list[str]:
        """Names in the order of the per-model metrics: the models, then "drafter" where there is one."""
        return [m.name for m in self.models] + ["drafter"] * (self.drafter is not None)

    # ------------------------------------------------------------ request API

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, target: str | None = None,
               group: Hashable | None = None) -> int:
        """Queues a request and returns its id; ``step`` decodes it. target: the name of one of the
        engine's targets (may be left out when there is only one). group: a key shared by requests one
        caller submits together (a server request's prompts x n): free slots go to the groups in turn,
        so a large group does not hold back the requests behind it (None: a group of its own). Every
        check of a request runs here, so that no request the engine cannot serve joins a batch (and
        fails a tick for the others)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams or None, got {params!r}")
        if target is None and len(self.targets) == 1:
            (target,) = self.targets
        if target not in self.targets:
            raise ValueError(f"unknown target {target!r}; this engine serves {sorted(self.targets)}")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.vocab_size
        if bad := [t for t in ids if not is_int(t) or not 0 <= t < vocab]:
            raise ValueError(f"prompt token ids must be ints in [0, {vocab}), got {bad[0]!r}")
        if bad := [t for t in params.stop_token_ids if t >= vocab]:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {bad}")
        if params.max_new_tokens > self.max_new_tokens(len(ids)):
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} (+ "
                             f"{self.scheduler.draft_lengths.max_gamma + 1} draft slots) exceeds max_len={self.max_len}")
        decoded = self.targets[target]
        if self.scheduler.sampler == "triton" and (why := fused_unsupported(decoded.verify_spec, [params],
                                                                            len(decoded.runners))):
            raise ValueError(f"sampler='triton' cannot serve this request: {why}")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request_id = self._next_id
        self._next_id += 1
        seq = decode.Sequence(request_id, decoded, ids, params, seed, frozenset(stop_ids),
                              Metrics.zeros(len(self.scheduler.runners)), group)
        self._requests[request_id] = _Request(seq, params.stop, time.perf_counter(),
                                              stop_from=0 if params.min_tokens == 0 else None)
        self.scheduler.add(seq)
        return request_id

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids, as ``submit`` sees them (text is tokenized without special tokens)."""
        if isinstance(prompt, str):
            return encode_text(self.tokenizer, prompt)
        if not isinstance(prompt, Sequence):
            raise ValueError(f"prompt must be a str or a sequence of token ids, got {prompt!r}")
        return list(prompt)

    def max_new_tokens(self, prompt_len: int) -> int:
        """The most new tokens a prompt of ``prompt_len`` tokens may ask for (< 1: the prompt does not fit):
        the cache holds the prompt, the new tokens and the draft slots of one speculative step."""
        return self.max_len - prompt_len - self.scheduler.draft_lengths.max_gamma - 1

    def abort(self, request_id: int) -> None:
        """Cancels a waiting or running request and frees its slot (unknown or finished ids: no-op)."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self.scheduler.abort(req.seq)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """One scheduler tick; an output for every request that committed tokens or finished."""
        outputs = []
        for seq in self.scheduler.step():
            req = self._requests[seq.request_id]
            generated = seq.tokens[seq.prompt_len:]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            finish = seq.finished
            if req.stop_from is None and len(generated) >= seq.params.min_tokens:
                req.stop_from = len(self.tokenizer.decode(generated[:seq.params.min_tokens], skip_special_tokens=True))
            cut = None if req.stop_from is None else _first_stop(text, req.stop, req.stop_from)
            if cut is not None:
                text, finish = text[:cut], "stop"
                self.scheduler.abort(seq)
            # Hold back text that may still become a stop string, or an incomplete UTF-8 character.
            safe = len(text) if finish else _safe_prefix(text, req.stop)
            out = RequestOutput(seq.request_id, text[req.sent:safe], seq.new, finish)
            req.sent = max(req.sent, safe)
            if finish:
                seq.metrics.wall_s = time.perf_counter() - req.submitted
                logprobs = seq.logprobs[:len(generated)] if seq.params.logprobs else None
                out.result = GenerationResult(text, generated, finish, logprobs, seq.metrics)
                del self._requests[seq.request_id]
            outputs.append(out)
        return outputs

    # ------------------------------------------------------------ convenience

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               target: str | None = None) -> Iterator[RequestOutput]:
        """Yields one prompt's text as it is committed; the last output carries the whole result.
        Closing the iterator early cancels the request."""
        self._check_idle()
        request_id = self.submit(prompt, params, target)
        try:
            while request_id in self._requests:
                yield from self.step()
        finally:
            self.abort(request_id)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 target: str | Sequence[str] | None = None, *, progress: bool = False) -> list[GenerationResult]:
        """One result per prompt (a single prompt is a list of one), decoded together in batches
        of up to max_batch; target: one name for all prompts or one per prompt (requests of different
        targets share the batch). ``progress`` shows a bar of finished requests."""
        self._check_idle()
        if not isinstance(prompts, Sequence) or isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt (or something submit refuses as one)
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        names = [target] * len(prompts) if target is None or isinstance(target, str) else list(target)
        if len(names) != len(prompts):
            raise ValueError(f"{len(names)} targets for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p, name in zip(prompts, params_list, names):
                ids.append(self.submit(prompt, p, name))
            results: dict[int, GenerationResult] = {}
            with tqdm(total=len(ids), disable=not progress, desc="generate", unit="req") as bar:
                while self.has_unfinished():
                    for out in self.step():
                        if out.result is not None:
                            results[out.request_id] = out.result
                            bar.update()
        finally:
            for request_id in ids:
                self.abort(request_id)
        return [results[i] for i in ids]

    def _check_idle(self) -> None:
        if self._requests:
            raise RuntimeError(f"{len(self._requests)} submitted requests are unfinished: drive them with step() "
                               "(generate and stream serve only their own prompts)")


def _end_of_generation_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's EOS and the END_OF_GENERATION tokens it has as special tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", {})  # id -> AddedToken
    ids = {i for i, token in added.items() if token.special and token.content in END_OF_GENERATION}
    return frozenset(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
    for s in stops:
        for k in range(min(len(s) - 1, safe), 0, -1):
            if text[:safe].endswith(s[:k]):
                safe -= k
                break
    return max(safe, 0)


def _check_loading(names: list[str], *, runner: str, dtype: torch.dtype | None, device: torch.device | str,
                   max_batch: int, max_len: int, cuda_graphs: bool | None, batch_invariant: bool) -> None:
    """The models to load here by name, and how: every check before the first one loads."""
    if not names:
        return  # nothing loads: runner, dtype, device and max_len are unused
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"models must be names / paths (str) or LoadedModels, got {name!r}")
        check_model(name)
    check_load_args(runner=runner, dtype=dtype, device=device, max_batch=max_batch, max_len=max_len,
                    batch_invariant=batch_invariant)
    if cuda_graphs is True and (runner != "native" or torch.device(device).type != "cuda"):
        raise ValueError(f"cuda_graphs=True needs native models on a CUDA device, got runner={runner!r} "
                         f"and device={device!r}")


def _checked_entries(n: int, ensemble: EnsembleSpec | None, method: str, targets: Mapping[str, TargetArg] | None,
                     drafter: bool) -> dict[str, tuple[tuple[int, ...], EnsembleSpec]]:
    """The engine's targets, checked: name -> (model indices, spec over them)."""
    if targets is None:
        if method == "single" and n != 1:
            raise ValueError(f"method 'single' runs one model, got {n}")
        if method in ("ensemble_sd", "se") and n < 2 and not drafter:
            raise ValueError(f"method {method!r} needs at least two models (or a drafter), got {n}")
        spec = EnsembleSpec.weighted([1.0]) if method == "single" else ensemble  # single: its model alone
        return {DEFAULT_TARGET: (tuple(range(n)), _checked_spec(spec, n))}
    if method != "ensemble_sd":
        raise ValueError(f"targets share one proposer: method 'ensemble_sd', got {method!r}")
    if ensemble is not None:
        raise ValueError("with targets, each target names its ensemble: pass ensemble=None")
    if not isinstance(targets, Mapping) or not targets:
        raise ValueError(f"targets must be a non-empty mapping name -> (model indices, EnsembleSpec | None), "
                         f"got {targets!r}")
    return {name: _checked_target(name, value, n) for name, value in targets.items()}


def _checked_spec(spec: EnsembleSpec | None, n: int) -> EnsembleSpec:
    """spec over n models (None: equal weights)."""
    spec = EnsembleSpec.weighted([1.0] * n) if spec is None else spec
    if not isinstance(spec, EnsembleSpec):
        raise TypeError(f"an ensemble must be an EnsembleSpec or None, got {type(spec).__name__}")
    spec.check_num_models(n)
    return spec


def _checked_target(name: str, value: TargetArg, n: int) -> tuple[tuple[int, ...], EnsembleSpec]:
    """A ``targets`` entry of an engine with n models -> (model indices, spec over them)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"target names must be non-empty strings, got {name!r}")
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not isinstance(value[0], Sequence):
        raise ValueError(f"target {name!r} must be (model indices, EnsembleSpec or None), got {value!r}")
    members = tuple(value[0])
    if not members:
        raise ValueError(f"target {name!r} has no models")
    if any(not is_int(i) or not 0 <= i < n for i in members) or len(set(members)) != len(members):
        raise ValueError(f"target {name!r}: model indices must be distinct ints in [0, {n}), got {list(members)}")
    try:
        return members, _checked_spec(value[1], len(members))
    except ValueError as e:
        raise ValueError(f"target {name!r}: {e}") from None


def _checked_order(proposer_order: Sequence[int], n: int) -> list[int]:
    """proposer_order as a list, checked: a permutation of the n model indices."""
    if (isinstance(proposer_order, str) or not isinstance(proposer_order, Sequence)
            or any(not is_int(i) for i in proposer_order) or sorted(proposer_order) != list(range(n))):
        raise ValueError(f"proposer_order must be a permutation of 0..{n - 1}, got {proposer_order!r}")
    return list(proposer_order)


def _check_targets(entries: Mapping[str, tuple[tuple[int, ...], EnsembleSpec]], method: str, sampler: Backend,
                   proposer: int | None) -> None:
    """What the targets ask of the proposer and of the sampler. proposer: the first proposer's runner
    index, or None while unknown (its own check waits, and the kernels' width counts no outside
    proposer: call again once it is known)."""
    for name, (members, spec) in entries.items():
        if method == "ensemble_sd" and members == (proposer,):  # the engine's one proposer drafts for every target
            raise ValueError(f"{_target_label(name)} is the proposer (model {proposer}) alone: ensemble_sd "
                             "needs another model or a drafter")
        outside = method == "ensemble_sd" and proposer is not None and proposer not in members
        if sampler == "triton" and (why := fused_unsupported(spec, [], len(members) + outside)):
            raise ValueError(f"sampler='triton' cannot run {_target_label(name)}: {why}")


def _checked_gammas(gammas: Sequence[int] | Literal["auto"] | AutoGammas | None, runs: int, method: str,
                    drafter: bool) -> DraftLengths | Literal["auto"] | None:
    """The draft lengths of ``runs`` runners that ``gammas`` gives; None (the default) and "auto" (for a
    speculative method: costs to measure) wait for the loaded models."""
    if gammas is None:
        return None
    if isinstance(gammas, AutoGammas):
        if len(gammas.costs) != runs:
            raise ValueError(f"AutoGammas has costs for {len(gammas.costs)} models, the engine runs {runs}")
        return gammas
    if gammas == "auto":
        return "auto" if method in ("ensemble_sd", "se") else FixedGammas([1] * runs)  # the others never draft
    if isinstance(gammas, str) or not isinstance(gammas, Sequence) or len(gammas) != runs:
        raise ValueError(f"gammas must be 'auto', an AutoGammas or {runs} draft lengths (one per model"
                         f"{', then the drafter' if drafter else ''}), got {gammas!r}")
    return FixedGammas(list(gammas))


def _target(members: tuple[int, ...], spec: EnsembleSpec, order: list[int], method: str) -> Target:
    """The Target of a checked entry; order: the engine's runner indices, first proposes first."""
    if method == "ensemble_sd":  # the engine's one proposer drafts for every target
        return Target(members, spec, (order[0], *(k for k in order[1:] if k in members)))
    return Target(members, spec, tuple(k for k in order if k in members))


def _target_label(name: str) -> str:
    return "this ensemble" if name == DEFAULT_TARGET else f"target {name!r}"


def _set_cuda_graphs(runners: Sequence[Runner], cuda_graphs: bool | None) -> None:
    graphable = [isinstance(r, Transformer) and r.device.type == "cuda" for r in runners]
    if cuda_graphs is True and not all(graphable):
        raise ValueError("cuda_graphs=True needs every model to be a native model on a CUDA device")
    for r, ok in zip(runners, graphable):
        if cuda_graphs is False and isinstance(r, Transformer):
            r.graphs = None
        elif cuda_graphs is not False and ok and r.graphs is None:
            r.use_cuda_graphs(GRAPH_MAX_WIDTH)
