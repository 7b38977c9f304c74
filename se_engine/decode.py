"""The decode loops of the four methods, over one sequence and n runners.

State of a sequence (positions are absolute token indices; the token at position p is predicted
by logits "at p", computed by forwarding the tokens before p):
    seq        committed tokens (prompt + emitted), c = len(seq)
    pending    drafted, not yet verified tokens at positions c .. E-1, with their proposers
    fed[m]     number of tokens of seq + pending in model m's KV cache
    logits[m]  model m's logits at positions c .. fed[m]

A pending position is verified once every model has logits there (the ensemble r needs them
all); verification runs oldest-first. After a rejection every cache is truncated to the
committed prefix it holds: no committed token is ever recomputed.

Methods:
    single       one model, plain sampling (the ensemble loop over one model, weight 1).
    ensemble     every model forwards every token; sample from r.
    ensemble_sd  a fixed proposer drafts gamma tokens, the others score them in one forward each;
                 after a full accept the next token is sampled from r.
    se           alternate proposal: the scorer, which now holds logits at the draft frontier,
                 samples its own next token there from its own q; that token opens its proposal
                 (gamma_m tokens), scored by the model that has waited longest. After a rejection
                 the cheapest model proposes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from triton_kernels.verify import Backend, sample_ensemble, verify

from .ensemble import EnsembleSpec
from .runner import Runner
from .sampling import STREAM_DRAFT, STREAM_ENSEMBLE, SamplingParams

METHODS = ("single", "ensemble", "ensemble_sd", "se")
_OWN = EnsembleSpec.weighted([1.0])  # a model's draft is a sample of the one-model "ensemble"


@dataclass
class Metrics:
    """Counters of one generation; per-model lists are in the engine's model order."""
    tokens: int = 0
    wall_s: float = 0.0
    forwards: list[int] = field(default_factory=list)
    positions_scored: list[int] = field(default_factory=list)
    drafts_tested: list[int] = field(default_factory=list)
    drafts_accepted: list[int] = field(default_factory=list)
    verify_steps: int = 0
    verify_s: float = 0.0  # wall time of verify steps, up to reading their result on the host

    @classmethod
    def zeros(cls, n: int) -> "Metrics":
        return cls(forwards=[0] * n, positions_scored=[0] * n, drafts_tested=[0] * n, drafts_accepted=[0] * n)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance_rate(self) -> list[float | None]:
        return [a / t if t else None for a, t in zip(self.drafts_accepted, self.drafts_tested)]

    @property
    def mean_accepted_per_step(self) -> float | None:
        return sum(self.drafts_accepted) / self.verify_steps if self.verify_steps else None

    def add(self, other: "Metrics") -> None:
        self.tokens += other.tokens
        self.wall_s += other.wall_s
        self.verify_steps += other.verify_steps
        self.verify_s += other.verify_s
        for name in ("forwards", "positions_scored", "drafts_tested", "drafts_accepted"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name))])

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
                "forwards": self.forwards, "positions_scored": self.positions_scored,
                "drafts_tested": self.drafts_tested, "drafts_accepted": self.drafts_accepted,
                "acceptance_rate": self.acceptance_rate, "verify_steps": self.verify_steps, "verify_s": self.verify_s,
                "mean_accepted_per_step": self.mean_accepted_per_step}


class SequenceDecoder:
    """Decodes one prompt; ``run()`` yields the lists of tokens committed at each step."""

    def __init__(self, runners: list[Runner], spec: EnsembleSpec | None, method: str, gammas: list[int],
                 order: list[int], params: SamplingParams, seed: int, prompt: list[int], stop_ids: set[int],
                 backend: Backend = "auto"):
        self.runners, self.spec, self.method, self.gammas, self.order = runners, spec, method, gammas, order
        self.backend = backend
        self.params, self.stop_ids = params, stop_ids
        self.device = runners[0].lengths.device
        self.seed = torch.tensor([seed], device=self.device)
        self.seq = list(prompt)
        self.prompt_len = len(prompt)
        self.pending: list[int] = []
        self.pending_by: list[int] = []
        n = len(runners)
        self.fed = [0] * n
        self.logits: list[dict[int, Tensor]] = [{} for _ in range(n)]
        self.logprobs: list[float] = []
        self.metrics = Metrics.zeros(n)
        self.finished: str | None = None  # "stop" | "length"
        for r in runners:
            r.reset()

    # ------------------------------------------------------------ primitives

    @property
    def frontier(self) -> int:
        return len(self.seq) + len(self.pending)

    def _feed(self, m: int, last_only: bool = False) -> None:
        """Forwards model m over every token it has not seen, up to the frontier."""
        tokens = (self.seq + self.pending)[self.fed[m]:self.frontier]
        out = self.runners[m].forward(torch.tensor([tokens], device=self.device), last_only=last_only)[0]
        first = self.frontier - out.shape[0] + 1
        for i in range(out.shape[0]):
            self.logits[m][first + i] = out[i]
        self.fed[m] = self.frontier
        self.metrics.forwards[m] += 1
        self.metrics.positions_scored[m] += len(tokens)

    def _sample(self, models: list[int], spec: EnsembleSpec, stream: int, want_logprob: bool = False) -> int:
        """A token at the frontier from the ensemble `spec` of `models`, which all hold logits there."""
        logits = [self.logits[m][self.frontier][None] for m in models]
        pos = torch.tensor([self.frontier], device=self.device)
        token, logprob = sample_ensemble(logits, spec, pos, [self.params], self.seed, stream, want_logprob,
                                         self.backend)
        if logprob is not None:
            self.logprobs.append(float(logprob[0]))
        return int(token[0])

    def _sample_ensemble(self) -> int:
        return self._sample(list(range(len(self.runners))), self.spec, STREAM_ENSEMBLE, self.params.logprobs)

    def _draft(self, m: int, count: int) -> None:
        """Model m proposes `count` tokens from its own q; its last draft is left unfed."""
        for _ in range(count):
            if self.frontier not in self.logits[m]:
                self._feed(m)
            self.pending.append(self._sample([m], _OWN, STREAM_DRAFT + m))
            self.pending_by.append(m)

    def _commit(self, tokens: list[int]) -> list[int]:
        """Appends tokens up to the first stop condition; returns those appended."""
        out = []
        for t in tokens:
            self.seq.append(t)
            out.append(t)
            if t in self.stop_ids:
                self.finished = "stop"
            elif len(self.seq) - self.prompt_len >= self.params.max_new_tokens:
                self.finished = "length"
            if self.finished:
                break
        self.metrics.tokens += len(out)
        self._prune()
        return out

    def _prune(self) -> None:
        c = len(self.seq)
        for d in self.logits:
            for pos in [p for p in d if p < c]:
                del d[pos]

    def _verify_ready(self) -> list[int]:
        """Verifies the oldest pending positions that every model has scored; returns emitted tokens."""
        c, n = len(self.seq), len(self.runners)
        t = 0
        while t < len(self.pending) and all(c + t in self.logits[m] for m in range(n)):
            t += 1
        if t == 0:
            return []
        start = time.perf_counter()
        res = verify(
            [torch.stack([self.logits[m][c + j] for j in range(t)]) for m in range(n)], self.spec,
            torch.tensor(self.pending[:t], device=self.device), torch.tensor(self.pending_by[:t], device=self.device),
            torch.arange(c, c + t, device=self.device), torch.tensor([0, t], device=self.device), [self.params],
            self.seed, want_logprobs=self.params.logprobs, max_n=t, backend=self.backend)
        a, emitted = int(res.num_accepted[0]), int(res.num_emitted[0])
        self.metrics.verify_s += time.perf_counter() - start
        for j in range(min(t, a + 1)):
            self.metrics.drafts_tested[self.pending_by[j]] += 1
        for j in range(a):
            self.metrics.drafts_accepted[self.pending_by[j]] += 1
        self.metrics.verify_steps += 1
        if res.logprobs is not None:
            self.logprobs.extend(res.logprobs[0, :emitted].tolist())
        if a < t:  # rejected at position c + a: everything after it is void
            self.pending, self.pending_by = [], []
            for m, runner in enumerate(self.runners):
                self.fed[m] = min(self.fed[m], c + a)
                runner.truncate(torch.tensor([self.fed[m]], device=self.device))
                for pos in [p for p in self.logits[m] if p > self.fed[m]]:
                    del self.logits[m][pos]
        else:
            self.pending, self.pending_by = self.pending[t:], self.pending_by[t:]
        return self._commit(res.tokens[0, :emitted].tolist())

    def _draft_count(self, m: int) -> int:
        """gamma_m, capped so that drafts never run past max_new_tokens."""
        left = self.params.max_new_tokens - (len(self.seq) - self.prompt_len) - len(self.pending)
        return max(1, min(self.gammas[m], left))

    # ------------------------------------------------------------ methods

    def run(self) -> Iterator[list[int]]:
        everyone = range(len(self.runners))
        for m in everyone:
            self._feed(m, last_only=True)  # prefill: only the logits at the frontier are needed
        step = {"single": self._step_ensemble, "ensemble": self._step_ensemble,
                "ensemble_sd": self._step_ensemble_sd, "se": self._step_se}[self.method]
        if self.method in ("ensemble_sd", "se"):
            yield self._commit([self._sample_ensemble()])
        while not self.finished:
            yield step()

    def _step_ensemble(self) -> list[int]:
        out = self._commit([self._sample_ensemble()])
        if not self.finished:
            for m in range(len(self.runners)):
                self._feed(m)
        return out

    def _step_ensemble_sd(self) -> list[int]:
        proposer = self.order[0]
        self._draft(proposer, self._draft_count(proposer))
        for m in range(len(self.runners)):
            self._feed(m)  # the proposer too: its logits at the frontier serve the bonus token
        out = self._verify_ready()
        if not self.pending and not self.finished and all(self.frontier in d for d in self.logits):
            out += self._commit([self._sample_ensemble()])
        return out

    def _step_se(self) -> list[int]:
        ready = [m for m in self.order if self.frontier in self.logits[m]]
        if ready:
            proposer = ready[0]
        else:  # after a rejection (or the first token) nobody holds logits at the frontier
            proposer = self.order[0]
            self._feed(proposer)
        self._draft(proposer, self._draft_count(proposer))
        others = [m for m in self.order if m != proposer]
        scorer = min(others, key=lambda m: (self.fed[m], self.order.index(m)))
        self._feed(scorer)
        return self._verify_ready()
