"""Counters of the decoding: per generation (``Metrics``) and per engine, over all ticks (``TickStats``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Counters of one generation; per-model lists run over all the engine's runners (its models,
    then the drafter), also those outside the request's target (zero there)."""
    tokens: int = 0
    wall_s: float = 0.0  # from submission to the last token
    forwards: list[int] = field(default_factory=list)  # forwards of each model that included this sequence
    positions_scored: list[int] = field(default_factory=list)
    drafts_tested: list[int] = field(default_factory=list)
    drafts_accepted: list[int] = field(default_factory=list)
    verify_steps: int = 0
    verify_s: float = 0.0  # wall time of the verify calls this sequence took part in, up to their result
    draft_lengths: list[tuple[int, int]] = field(default_factory=list)  # (proposer, gamma) of each proposal
    # [model][d]: drafts of that proposer at depth d of their proposal (0 = first) that were tested / accepted
    tested_at_depth: list[list[int]] = field(default_factory=list)
    accepted_at_depth: list[list[int]] = field(default_factory=list)
    prefix_hits: list[int] = field(default_factory=list)    # 1 where the model's prefill started from a cached prefix
    prefix_tokens: list[int] = field(default_factory=list)  # prompt tokens whose cache entries it reused

    @classmethod
    def zeros(cls, n: int) -> "Metrics":
        """Counters of n runners, all zero."""
        return cls(forwards=[0] * n, positions_scored=[0] * n, drafts_tested=[0] * n, drafts_accepted=[0] * n,
                   tested_at_depth=[[] for _ in range(n)], accepted_at_depth=[[] for _ in range(n)],
                   prefix_hits=[0] * n, prefix_tokens=[0] * n)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance_rate(self) -> list[float | None]:
        return [a / t if t else None for a, t in zip(self.drafts_accepted, self.drafts_tested)]

    @property
    def mean_draft_length(self) -> list[float | None]:
        return [statistics.fmean(lens) if (lens := [g for p, g in self.draft_lengths if p == m]) else None
                for m in range(len(self.forwards))]

    @property
    def mean_accepted_per_step(self) -> float | None:
        return sum(self.drafts_accepted) / self.verify_steps if self.verify_steps else None

    def count_test(self, proposer: int, depth: int, accepted: bool) -> None:
        """One tested draft.

        proposer: the runner that drafted it.
        depth: its index in its proposal (0 = first).
        accepted: whether verification accepted it."""
        self.drafts_tested[proposer] += 1
        self.drafts_accepted[proposer] += accepted
        _count_at(self.tested_at_depth[proposer], depth, 1)
        _count_at(self.accepted_at_depth[proposer], depth, int(accepted))

    def add(self, other: "Metrics") -> None:
        """Adds the counters of another generation over the same runners."""
        self.tokens += other.tokens
        self.wall_s += other.wall_s
        self.verify_steps += other.verify_steps
        self.verify_s += other.verify_s
        self.draft_lengths += other.draft_lengths
        self.forwards = _plus(self.forwards, other.forwards)
        self.positions_scored = _plus(self.positions_scored, other.positions_scored)
        self.drafts_tested = _plus(self.drafts_tested, other.drafts_tested)
        self.drafts_accepted = _plus(self.drafts_accepted, other.drafts_accepted)
        self.prefix_hits = _plus(self.prefix_hits, other.prefix_hits)
        self.prefix_tokens = _plus(self.prefix_tokens, other.prefix_tokens)
        _add_at_depth(self.tested_at_depth, other.tested_at_depth)
        _add_at_depth(self.accepted_at_depth, other.accepted_at_depth)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
                "forwards": self.forwards, "positions_scored": self.positions_scored,
                "drafts_tested": self.drafts_tested, "drafts_accepted": self.drafts_accepted,
                "acceptance_rate": self.acceptance_rate, "verify_steps": self.verify_steps, "verify_s": self.verify_s,
                "mean_accepted_per_step": self.mean_accepted_per_step, "mean_draft_length": self.mean_draft_length,
                "draft_lengths": self.draft_lengths, "tested_at_depth": self.tested_at_depth,
                "accepted_at_depth": self.accepted_at_depth, "prefix_hits": self.prefix_hits,
                "prefix_tokens": self.prefix_tokens}


@dataclass
class TickStats:
    """Engine-wide counters over all ticks (a batched forward counts once)."""
    ticks: int = 0
    forwards: list[int] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    verify_calls: int = 0
    verify_s: float = 0.0
    sample_s: float = 0.0
    prefix_hits: list[int] = field(default_factory=list)    # per model: requests that started from a cached prefix
    prefix_tokens: list[int] = field(default_factory=list)  # per model: prompt tokens whose cache entries were reused


def _plus(a: list[int], b: list[int]) -> list[int]:
    """Per-runner sums."""
    return [x + y for x, y in zip(a, b)]


def _add_at_depth(mine: list[list[int]], theirs: list[list[int]]) -> None:
    """Per-runner, per-depth counts ``theirs`` added into ``mine``, in place."""
    for counts, more in zip(mine, theirs):
        for d, amount in enumerate(more):
            _count_at(counts, d, amount)


def _count_at(counts: list[int], d: int, amount: int) -> None:
    """counts[d] += amount, growing counts as needed."""
    counts.extend([0] * (d + 1 - len(counts)))
    counts[d] += amount
