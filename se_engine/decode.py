"""Batched decoding for the four methods: a scheduler that advances every sequence by one action per tick.

State of a sequence (positions are absolute token indices; the token at position p is predicted
by logits "at p", computed by forwarding the tokens before p):
    tokens     committed tokens (prompt + emitted), c = len(tokens)
    pending    drafts (``Draft``: token, proposer, depth in its proposal): drafted, not yet verified
               tokens at positions c .. F-1 (F, the frontier)
    fed[m]     number of tokens of tokens + pending in model m's cache slot
    logits[m]  model m's logits at positions c .. fed[m]

Each sequence decodes one target (``Target``): an ensemble spec over some of the scheduler's runners
(its members). An engine with one target has all its models as members; a multi-target engine
serves requests for several targets (single models and ensembles over its models) with one shared
proposer. "Every model" below means the sequence's target's members.

Each sequence has one next action (``Action``: a kind and its models), and a tick runs it:
    ENSEMBLE   every model feeds up to the frontier; a token is drawn from r there and committed
    DRAFT m    model m feeds up to the frontier (unless it holds logits there); it draws a draft from its q
    SCORE ms   the models ms feed every pending token; then every position that all models have
               scored is verified, oldest first, in one verify call for the whole batch
    FORK       a sequence whose prompt another one is prefilling copies that prefill once it is done

A tick: (1) each model forwards once, over every sequence whose action needs it (ragged rows
packed; sequences of every target together), except that a model other than the cheapest may sit a
tick out while other sequences advance without it (up to max_stall ticks), so that its waiting
sequences line up for one shared forward; (2) one verify call per target over its sequences with
verifiable positions; (3) every action whose models hold logits at the frontier draws its token (per
target, one sampling call per drafting model and one for the ensemble). After a rejection every
cache is truncated to the committed prefix it holds: no committed token is ever recomputed. Each
sequence keeps its own pending drafts, proposer and accepted length, and a rejection in one discards
nothing of another; when a sequence runs changes none of its tokens (its randomness is keyed on its
seed and positions).

Every sequence starts with ENSEMBLE: its prefill, and its first token drawn from r. Its slot may
be a cached one (``se_engine.prefix_cache``) that already holds a prefix of its prompt: the
prefill then feeds only the rest (fed[m] starts at the entries runner m kept). Which action
follows is its method's answer (``se_engine.methods``, one policy per method); their cycles:
    single, ensemble  ENSEMBLE, ENSEMBLE, ...
    ensemble_sd       a fixed proposer P: DRAFT P x gamma_P, SCORE (all models; P's last draft too),
                      and after a full accept ENSEMBLE in the same tick. P is the cheapest model, or
                      a draft-only runner outside the ensemble (the drafter, e.g. a
                      ``NestedDrafter``): runner index n, after the n models. A P outside a target's
                      members feeds only when it drafts, and verify takes its logits as q through
                      ``EnsembleSpec.with_drafter`` (r ignores them)
    se                alternate proposal: DRAFT p x gamma_p, SCORE by the model that has waited
                      longest; after a full accept the scorer, which now holds logits at the frontier,
                      draws its own draft there in the same tick and proposes next; after a
                      rejection the cheapest model proposes.

A proposal of gamma_p drafts ends early after a draft that its proposer was unsure of: the top
probability of softmax(its logits) there below ``confidence_threshold``. That draft is still
tested (it cost no forward beyond the ones its predecessors needed); the forwards for the drafts
after it, likely rejected, are saved. Exactness: whether position p holds a draft matters only when
every draft before p is accepted, and then the rule's input (the proposer's logits up to p) is a
function of the committed prefix: a draft length chosen from the past.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from .ensemble import EnsembleSpec
from .gamma import DraftLengths
from .methods import DRAFT, ENSEMBLE, FORK, SCORE, Action, Method
from .metrics import Metrics, TickStats
from .prefix_cache import Hit, PrefixCache
from .runner import Runner
from .sampling import STREAM_DRAFT, STREAM_ENSEMBLE, SamplingParams
from .verify import Backend, sample_ensemble, verify

MAX_STALL = 8
_OWN = EnsembleSpec.weighted([1.0])  # a model's draft is a sample of the one-model "ensemble"


@dataclass(frozen=True, eq=False)  # identity: the scheduler groups sequences by target
class Target:
    """What a sequence decodes: r = spec over the logits of the runners ``members``.

    order: runner indices, first proposes first (ensemble_sd: the proposer, a member or not, then the
    other members; se: the members). Draft random streams are numbered by a runner's place in
    ``runners``, so a target served beside others draws what an engine of its own would draw (its
    members as the models, in order, and an outside proposer as the drafter)."""
    members: tuple[int, ...]
    spec: EnsembleSpec
    order: tuple[int, ...]

    @cached_property
    def runners(self) -> tuple[int, ...]:
        """The runners whose logits verify takes, in its order: the members, then a proposer from
        outside them (its logits are the q of its drafts)."""
        return self.members + tuple(m for m in self.order if m not in self.members)

    @cached_property
    def verify_spec(self) -> EnsembleSpec:
        """spec over ``runners``: an outside proposer joins with weight 0."""
        return self.spec.with_drafter() if len(self.runners) > len(self.members) else self.spec


@dataclass(frozen=True)
class Draft:
    """A drafted, not yet verified token."""
    token: int
    proposer: int  # the runner that drew it
    depth: int     # its index in its proposal (0 = first)


@dataclass(eq=False)  # identity: the scheduler finds sequences in its lists
class Sequence:
    """One request's decoding state (see the module docstring); owned by the Scheduler."""
    request_id: int
    target: Target
    tokens: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    metrics: Metrics
    group: Hashable = None  # a key shared by the sequences one caller submitted together; None: alone
    prompt_len: int = 0
    slot: int = -1
    pending: list[Draft] = field(default_factory=list)  # at positions c .. F-1
    fed: list[int] = field(default_factory=list)
    logits: list[dict[int, Tensor]] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    action: Action = Action(ENSEMBLE)
    drafts_left: int = 0
    stalled: int = 0  # consecutive ticks spent waiting for a deferred model
    source: "Sequence | None" = None  # FORK: the sequence with the same prompt whose prefill it copies
    acceptance: list[list[float]] = field(default_factory=list)  # per proposer: discounted [accepted, tested]
    new: list[int] = field(default_factory=list)  # tokens committed in the current tick
    finished: str | None = None  # "stop" | "length"

    @property
    def queue_key(self) -> Hashable:
        """Its group's key in the scheduler's queues (a sequence alone is its own group)."""
        return self if self.group is None else self.group

    @property
    def frontier(self) -> int:
        return len(self.tokens) + len(self.pending)

    def num_verifiable(self) -> int:
        """Leading pending positions that every model has scored."""
        c, t = len(self.tokens), 0
        while t < len(self.pending) and all(c + t in self.logits[m] for m in self.target.runners):
            t += 1
        return t


@dataclass(frozen=True)
class _Verdict:
    """One sequence's result of a verify call."""
    accepted: int            # leading drafts accepted
    tokens: list[int]        # emitted: the accepted drafts, then the recovered token at a rejection
    logprobs: list[float]    # log r of each emitted token, where the call computed them (else empty)


class Scheduler:
    """Runs the sequences of one engine in up to ``max_batch`` cache slots, one tick at a time.

    Requests wait for a free slot: an empty one (``free``) or a cached one (``prefix_cache``). Each
    waits in its group's queue (``Sequence.group``: the sequences one caller submitted together), and
    free slots go to the groups in turn, FIFO within a group, so that one request of many sequences
    delays a small one by about one slot's turn, not by all its sequences. ``add`` and ``abort`` may
    be called between ticks (continuous batching).
    Each runner's slot s holds the same sequence (runners outside its target hold nothing there).
    """

    def __init__(self, runners: list[Runner], method: Method, draft_lengths: DraftLengths, order: list[int],
                 vocab_size: int, *, sampler: Backend, confidence_threshold: float, max_batch: int | None = None,
                 max_stall: int | None = None, prefix_cache: bool = True):
        """runners: the engine's models, then the drafter where there is one; method: the policy that
        every sequence follows; order: runner indices, cheapest first (the shared proposer of
        ensemble_sd first); each sequence brings its Target. vocab_size: the shared vocabulary, the
        first vocab_size logits of every runner (the rest: padding rows of larger output layers).
        sampler, confidence_threshold: the Engine's (which checks them; the threshold ends a proposal
        early, module docstring). max_batch: at most, and by default, what every runner holds.
        prefix_cache: keep freed slots' entries for later requests' prompts (else empty them)."""
        capacity = min(r.max_batch for r in runners)
        if max_batch is not None and max_batch > capacity:
            raise ValueError(f"max_batch={max_batch} but the loaded models hold {capacity} sequences")
        self.method, self.order = method, order
        self.runners, self.vocab_size = runners, vocab_size
        self.draft_lengths = draft_lengths
        self.confidence_threshold = confidence_threshold
        # Ticks a sequence may wait for an expensive model while others draft: about one proposal
        # (auto's cap of MAX_GAMMA is reached only by a cheap drafter on a long confident run).
        self.max_stall = min(draft_lengths.max_gamma, MAX_STALL) if max_stall is None else max_stall
        self.sampler = sampler
        self.device = runners[0].device
        self.max_batch = max_batch or capacity
        self.free = list(range(self.max_batch - 1, -1, -1))
        self.prefix_cache = PrefixCache(runners, enabled=prefix_cache)
        self._queues: dict[Hashable, deque[Sequence]] = {}  # group -> its waiting sequences; in turn order
        self.running: list[Sequence] = []
        n = len(self.runners)
        self.stats = TickStats(forwards=[0] * n, forward_s=[0.0] * n, prefix_hits=[0] * n, prefix_tokens=[0] * n)

    # ------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        self._queues.setdefault(seq.queue_key, deque()).append(seq)

    @property
    def waiting(self) -> list[Sequence]:
        """The sequences waiting for a slot."""
        return [seq for queue in self._queues.values() for seq in queue]

    def abort(self, seq: Sequence) -> None:
        """Drops a waiting or running sequence and frees its slot."""
        queue = self._queues.get(seq.queue_key)
        if queue is not None and seq in queue:
            queue.remove(seq)
            if not queue:
                del self._queues[seq.queue_key]
        elif seq in self.running:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Takes a sequence out of the batch and frees its slot: cached, or else emptied (no cache
        entry of a slot nobody uses sits near max_len, where a CUDA-graph bucket over it runs eagerly)."""
        self.running.remove(seq)
        if not self.prefix_cache.put(seq.slot, seq.tokens):
            for runner in self.runners:
                runner.truncate([seq.slot], [0])
            self.free.append(seq.slot)

    def idle_slots(self) -> list[int]:
        """The slots no sequence holds: the empty ones and the cached ones."""
        return self.free + list(self.prefix_cache.entries)

    def has_work(self) -> bool:
        return bool(self._queues or self.running)

    def _next_waiting(self) -> Sequence:
        """The first sequence of the group whose turn it is; that group then goes to the back."""
        group, queue = next(iter(self._queues.items()))
        seq = queue.popleft()
        del self._queues[group]
        if queue:
            self._queues[group] = queue
        return seq

    def _admit(self) -> None:
        while self._queues and (self.free or self.prefix_cache):
            seq = self._next_waiting()
            seq.prompt_len = len(seq.tokens)
            seq.logits = [{} for _ in self.runners]
            seq.acceptance = [[0.0, 0.0] for _ in self.runners]
            seq.action = Action(ENSEMBLE, seq.target.members)
            seq.source = next((s for s in self.running if s.action.kind == ENSEMBLE and s.target is seq.target
                               and s.tokens == seq.tokens and s.source is None and len(s.tokens) == s.prompt_len),
                              None)
            if seq.source is not None:
                seq.action = Action(FORK)
            hit = None if seq.source is not None else self.prefix_cache.lookup(seq.tokens, seq.target.runners)
            self._take_slot(seq, hit)
            self.running.append(seq)

    def _take_slot(self, seq: Sequence, hit: Hit | None) -> None:
        """Gives seq the slot of its prefix-cache hit (its runners truncated to the entries they
        keep), else an empty slot, else the least recently cached one; sets fed and the metrics."""
        if hit is not None:
            self.prefix_cache.take(hit.slot)
            seq.slot, reuse = hit.slot, hit.reuse
        else:
            seq.slot = self.free.pop() if self.free else self.prefix_cache.evict()
            reuse = (0,) * len(self.runners)
        for m, (runner, kept) in enumerate(zip(self.runners, reuse)):
            runner.truncate([seq.slot], [kept])
            seq.metrics.prefix_hits[m] += kept > 0
            seq.metrics.prefix_tokens[m] += kept
            self.stats.prefix_hits[m] += kept > 0
            self.stats.prefix_tokens[m] += kept
        seq.fed = list(reuse)

    def _fork(self, seqs: list[Sequence]) -> None:
        """Sequences waiting on another's prefill copy its caches and logits once all models have fed
        its prompt, then draw their own first token in this tick. If that sequence has left or
        moved on, they prefill themselves."""
        for seq in seqs:
            src = seq.source
            in_prefill = src in self.running and len(src.tokens) == src.prompt_len
            if in_prefill and all(src.fed[m] == src.prompt_len for m in src.target.members):
                for runner in self.runners:
                    runner.fork(src.slot, [seq.slot])
                seq.fed = list(src.fed)
                seq.logits = [dict(d) for d in src.logits]
            elif in_prefill:
                continue
            seq.source = None
            seq.action = Action(ENSEMBLE, seq.target.members)

    # ------------------------------------------------------------ one tick

    def step(self) -> list[Sequence]:
        """Advances every running sequence by one action; returns those that committed tokens
        (their ``new`` holds them) or finished. Finished sequences have left the batch."""
        self._admit()
        running = list(self.running)
        for seq in running:
            seq.new = []
        for m in range(len(self.runners)):
            need = [s for s in running if m in s.action.models and s.fed[m] < s.frontier]
            if self._defer(m, running, need):
                for seq in need:
                    seq.stalled += 1
            else:
                self._forward(m, need)
        self._fork([s for s in running if s.action.kind == FORK])
        fed = [s for s in running if s.action.kind != FORK and all(s.fed[m] == s.frontier for m in s.action.models)]
        for seq in fed:
            seq.stalled = 0
        self._verify([s for s in fed if s.action.kind == SCORE])
        ready = [s for s in fed if not s.finished and all(s.fed[m] == s.frontier for m in s.action.models)]
        drafts = [[s for s in ready if s.action == Action(DRAFT, (m,))] for m in range(len(self.runners))]
        for seqs in _by_target([s for s in ready if s.action.kind == ENSEMBLE]):
            self._draw_ensemble(seqs)
        for m, seqs in enumerate(drafts):
            for group in _by_target(seqs):
                self._draw_drafts(m, group)
        self.stats.ticks += 1
        for seq in running:
            if seq.finished:
                self._release(seq)
        return [s for s in running if s.new or s.finished]

    def _defer(self, m: int, running: list[Sequence], need: list[Sequence]) -> bool:
        """Whether model m sits this tick out although ``need`` waits for it: m is not the cheapest
        model, another sequence advances without m this tick, and nobody has waited max_stall ticks.
        Sequences waiting for an expensive model then line up, and one of its forwards serves them
        all (otherwise a batch in mixed phases runs it nearly every tick). Waiting changes no token."""
        return (bool(need) and m != self.order[0]
                and any(m not in s.action.models and s.action.kind != FORK for s in running)
                and max(s.stalled for s in need) < self.max_stall)

    def _forward(self, m: int, seqs: list[Sequence]) -> None:
        """Model m, once, over each sequence's tokens it has not seen, up to the frontier. It keeps
        the logits at positions >= c (the ones the next verification or draw can use)."""
        if not seqs:
            return
        start = time.perf_counter()
        rows = [s.slot for s in seqs]
        feeds = [(s.tokens + [d.token for d in s.pending])[s.fed[m]:s.frontier] for s in seqs]
        # Feeding positions fed .. F-1 yields logits at fed + 1 .. F; those before c are spent.
        keep = [s.frontier - max(s.fed[m], len(s.tokens) - 1) for s in seqs]
        out = self.runners[m].forward(rows, feeds, keep)[:, :self.vocab_size]
        at = 0
        for s, fed, k in zip(seqs, feeds, keep):
            for i in range(k):
                s.logits[m][s.frontier - k + 1 + i] = out[at + i]
            at += k
            s.fed[m] = s.frontier
            s.metrics.forwards[m] += 1
            s.metrics.positions_scored[m] += len(fed)
        self.stats.forwards[m] += 1
        self.stats.forward_s[m] += time.perf_counter() - start

    def _verify(self, scored: list[Sequence]) -> None:
        """One verify call per target over the verifiable positions of its sequences that were just
        scored. (With three or more models a scored segment may still wait for another model's logits.)"""
        counts = {s: s.num_verifiable() for s in scored}
        for s, t in counts.items():
            if not t:
                self._after_score(s, rejected=False)
        for seqs in _by_target([s for s, t in counts.items() if t]):
            self._verify_target(seqs, [counts[s] for s in seqs])

    def _verify_target(self, seqs: list[Sequence], counts: list[int]) -> None:
        """Verifies the first counts[i] pending drafts of seqs[i], sequences of one target."""
        start = time.perf_counter()
        verdicts = self._call_verify(seqs, counts, *self._pack_verify(seqs, counts))
        elapsed = time.perf_counter() - start
        self.stats.verify_calls += 1
        self.stats.verify_s += elapsed
        for s, t, verdict in zip(seqs, counts, verdicts):
            self._apply_verdict(s, t, verdict, elapsed)

    def _pack_verify(self, seqs: list[Sequence], counts: list[int]
                     ) -> tuple[list[Tensor], Tensor, Tensor, Tensor, Tensor | None]:
        """The rows of one verify call: seqs[i]'s first counts[i] pending positions, T in all.

        seqs: sequences of one target.
        counts: how many pending drafts of each to verify.
        Returns each of the target's runners' logits [T, V] (in ``target.runners`` order),
        [T] int64 each: the drafts, their proposers (as places in ``target.runners``) and positions,
        and the suppressed tokens [T, V] bool (``_suppress``)."""
        target = seqs[0].target
        rows = [(s, len(s.tokens) + j) for s, t in zip(seqs, counts) for j in range(t)]
        logits = [torch.stack([s.logits[m][pos] for s, pos in rows]) for m in target.runners]
        local = {m: i for i, m in enumerate(target.runners)}  # verify indexes logits by place in target.runners
        drafts, proposers, positions = torch.tensor(
            [[s.pending[pos - len(s.tokens)].token for s, pos in rows],
             [local[s.pending[pos - len(s.tokens)].proposer] for s, pos in rows],
             [pos for _, pos in rows]], device=self.device)
        return logits, drafts, proposers, positions, self._suppress(rows, logits[0].shape[-1])

    def _call_verify(self, seqs: list[Sequence], counts: list[int], logits: list[Tensor], drafts: Tensor,
                     proposers: Tensor, positions: Tensor, suppress: Tensor | None) -> list[_Verdict]:
        """One verify call over the rows of ``_pack_verify``, and its results read back.

        seqs, counts: as for ``_pack_verify``.
        logits, drafts, proposers, positions, suppress: what ``_pack_verify`` returned for them.
        Returns each sequence's verdict."""
        offsets = torch.tensor([0, *counts], device=self.device).cumsum(0)
        seeds = torch.tensor([s.seed for s in seqs], device=self.device)
        params = [s.params for s in seqs]
        res = verify(logits, seqs[0].target.verify_spec, drafts, proposers, positions, offsets, params, seeds,
                     want_logprobs=any(p.logprobs for p in params), max_n=max(counts), backend=self.sampler,
                     suppress=suppress)
        # One read-back of the integer results (a second only for logprobs): the call's sync point.
        results = torch.cat([res.num_accepted[:, None], res.num_emitted[:, None], res.tokens], dim=1).tolist()
        logprobs = res.logprobs.tolist() if res.logprobs is not None else [[]] * len(seqs)
        return [_Verdict(a, tokens[:e], lp[:e]) for (a, e, *tokens), lp in zip(results, logprobs)]

    def _apply_verdict(self, s: Sequence, t: int, verdict: _Verdict, elapsed: float) -> None:
        """A sequence's share of a verify call: its metrics and proposers' acceptance, the commit of the
        emitted tokens, and its next action.

        s: the sequence.
        t: how many of its pending drafts were verified.
        verdict: their result.
        elapsed: the wall time of the call."""
        a = verdict.accepted
        s.metrics.verify_steps += 1
        s.metrics.verify_s += elapsed
        tested = s.pending[:min(t, a + 1)]  # the accepted drafts and the rejected one
        for j, d in enumerate(tested):
            s.metrics.count_test(d.proposer, d.depth, j < a)
        by = [d.proposer for d in tested]
        for m in {d.proposer for d in s.pending[:t]}:
            self.draft_lengths.observe(s.acceptance[m], by.count(m), by[:a].count(m))
        if s.params.logprobs:
            s.logprobs.extend(verdict.logprobs)
        rejected = a < t
        if rejected:  # at position c + a: every later draft and cache entry is void
            self._roll_back(s, len(s.tokens) + a)
        else:
            del s.pending[:t]
        self._commit(s, verdict.tokens)
        if not s.finished:
            self._after_score(s, rejected)

    def _roll_back(self, s: Sequence, keep: int) -> None:
        """Drops every pending draft and every cache entry and logit past position ``keep``."""
        s.pending = []
        for m, runner in enumerate(self.runners):
            s.fed[m] = min(s.fed[m], keep)
            runner.truncate([s.slot], [s.fed[m]])
            for pos in [p for p in s.logits[m] if p > s.fed[m]]:
                del s.logits[m][pos]

    def _draw_ensemble(self, seqs: list[Sequence]) -> None:
        """A token from r at the frontier of each sequence (all of one target), committed."""
        target = seqs[0].target
        tokens, logprobs = self._draw(list(target.members), target.spec, STREAM_ENSEMBLE, seqs)
        for i, s in enumerate(seqs):
            if s.params.logprobs:
                s.logprobs.append(logprobs[i])
            self._commit(s, tokens[i:i + 1])
            if not s.finished:
                self._act(s, self.method.after_ensemble_draw(target))

    def _draw_drafts(self, m: int, seqs: list[Sequence]) -> None:
        """A draft from model m's own q at the frontier of each sequence (all of one target)."""
        target = seqs[0].target
        tokens, unsure = self._draw([m], _OWN, STREAM_DRAFT + target.runners.index(m), seqs)
        for s, token, stop in zip(seqs, tokens, unsure or [False] * len(seqs)):
            depth = s.metrics.draft_lengths[-1][1] - s.drafts_left
            s.pending.append(Draft(token, m, depth))
            s.drafts_left -= 1
            if stop and s.drafts_left:  # the proposal ends here: its metrics record the drafts it made
                s.metrics.draft_lengths[-1] = (m, depth + 1)
                s.drafts_left = 0
            if s.drafts_left == 0:
                s.action = self.method.after_proposal(target, m, s.fed)

    def _unsure(self, q: Tensor, seqs: list[Sequence]) -> Tensor:
        """[R] bool: whether the proposer's top probability, from its logits q [R, V] at each
        sequence's frontier, is below the threshold."""
        return q.float().softmax(-1).amax(-1) < self.confidence_threshold  # softmax: row-invariant, unlike logsumexp

    def _draw(self, models: list[int], spec: EnsembleSpec, stream: int,
              seqs: list[Sequence]) -> tuple[list[int], list[float] | list[bool] | None]:
        """One sampling call: a token from spec over the models' logits at each sequence's frontier,
        and beside it, for the ensemble stream, its log r (when a sequence asks for logprobs), or for
        a draft stream under a confidence threshold, whether the proposer was unsure there."""
        start = time.perf_counter()
        logits = [torch.stack([s.logits[m][s.frontier] for s in seqs]) for m in models]
        positions = torch.tensor([s.frontier for s in seqs], device=self.device)
        seeds = torch.tensor([s.seed for s in seqs], device=self.device)
        params = [s.params for s in seqs]
        ensemble = stream == STREAM_ENSEMBLE
        want = ensemble and any(p.logprobs for p in params)
        # Drafts come from the proposer's own q, never suppressed (verify rejects what r forbids).
        suppress = self._suppress([(s, s.frontier) for s in seqs], logits[0].shape[-1]) if ensemble else None
        tokens, logprobs = sample_ensemble(logits, spec, positions, params, seeds, stream, want, self.sampler, suppress)
        if stream == STREAM_ENSEMBLE or self.confidence_threshold <= 0:
            out = tokens.tolist(), None if logprobs is None else logprobs.tolist()
        else:  # one read-back of both
            drawn, unsure = torch.stack([tokens, self._unsure(logits[0], seqs).long()]).tolist()
            out = drawn, [bool(u) for u in unsure]
        self.stats.sample_s += time.perf_counter() - start
        return out

    def _suppress(self, rows: list[tuple[Sequence, int]], width: int) -> Tensor | None:
        """[len(rows), width] bool: at each (sequence, position), the tokens r must not emit there (its
        stop tokens while it has fewer than min_tokens new tokens); None when there are none."""
        banned = [(i, sorted(s.stop_ids)) for i, (s, pos) in enumerate(rows)
                  if pos - s.prompt_len < s.params.min_tokens]
        if not banned:
            return None
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, ids in banned:
            mask[i, ids] = True
        return mask.to(self.device)

    # ------------------------------------------------------------ the method's next action

    def _after_score(self, s: Sequence, rejected: bool) -> None:
        """s's next action once its scored drafts are verified (rejected: one was rejected), or once
        its scorer has fed them while other models' logits are still missing (rejected False)."""
        self._act(s, self.method.after_verification(s.target, s.action.models, rejected))

    def _act(self, s: Sequence, action: Action) -> None:
        """Makes ``action`` s's next one; a DRAFT starts a proposal."""
        if action.kind == DRAFT:
            self._start_proposal(s, action.models[0])
        else:
            s.action = action

    def _start_proposal(self, s: Sequence, m: int) -> None:
        """Model m proposes gamma drafts (its fixed gamma, or the auto choice), capped so that drafts
        never run past max_new_tokens."""
        scorers = self.method.scorers(s.target, m, s.fed)
        gamma = self.draft_lengths.choose(m, s.acceptance[m], s.frontier in s.logits[m],
                                          {o: s.frontier - s.fed[o] for o in scorers}, self.method)
        left = s.params.max_new_tokens - (len(s.tokens) - s.prompt_len) - len(s.pending)
        s.drafts_left = max(1, min(gamma, left))
        s.metrics.draft_lengths.append((m, s.drafts_left))
        s.action = Action(DRAFT, (m,))

    def _commit(self, s: Sequence, tokens: Seq[int]) -> None:
        """Appends tokens up to the first stop condition; drops logits the sequence has passed."""
        for t in tokens:
            s.tokens.append(t)
            s.new.append(t)
            if t in s.stop_ids:
                s.finished = "stop"
            elif len(s.tokens) - s.prompt_len >= s.params.max_new_tokens:
                s.finished = "length"
            if s.finished:
                break
        s.metrics.tokens = len(s.tokens) - s.prompt_len
        c = len(s.tokens)
        for d in s.logits:
            for pos in [p for p in d if p < c]:
                del d[pos]


def _by_target(seqs: list[Sequence]) -> list[list[Sequence]]:
    """seqs grouped by target, each group in the order of seqs."""
    groups: dict[Target, list[Sequence]] = {}
    for s in seqs:
        groups.setdefault(s.target, []).append(s)
    return list(groups.values())
