"""Draft lengths: a fixed gamma per model, or one chosen per proposal from measured costs ("auto").

Auto: before model m proposes for a sequence, it picks the gamma that maximises the expected tokens
per second of that proposal and its verification (the segment of the alternate-proposal cycle):

    tokens(g) = (1 - a^g) / (1 - a)        accepted drafts, or the recovered token at a rejection
                + a^g          (where the method draws a token from r at once after a full accept:
                                ``Method.extra_token_after_full_accept``, ensemble_sd)
    time(g)   = (g - free) c_m(1) + sum_{o in scorers, o != m} c_o(k_o + g)
                + c_m(1)       (ensemble_sd, m a member: m also feeds its last draft, to score it)

    a        the sequence's acceptance rate of m's drafts, smoothed (discounted counts, prior PRIOR)
    free     1 if m already holds logits at the frontier (it has just scored a fully accepted
             segment, so its first draft needs no forward), else 0
    c_x(k)   model x's forward time over k query tokens, measured at start-up (fixed + per token)
    k_o      positions scorer o must feed besides the new drafts (pending drafts, the last commit)

The rate is myopic: a full accept also spares the next proposer a forward (its free first draft),
which this segment does not count; that proposal counts it through its own ``free``.

With a confidence threshold (``se_engine.decode``) the chosen gamma is a cap: a proposal may end
sooner, after a draft its proposer was unsure of.

Exactness does not depend on the choice: a draft length decided from the sequence's past (its own
acceptance history) and fixed costs leaves every verified position's law unchanged. Costs are
measured at start-up (again only between generations: ``Engine.refresh_costs``), and acceptance
is per sequence: so a seeded request emits the same tokens whatever else is in the batch
(reproducible across runs given the same costs: pass ``AutoGammas(costs)``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .checks import is_int
from .methods import Method
from .runner import Runner

PRIOR = (0.8, 2.0)  # acceptance prior: mean, weight in pseudo-drafts
DECAY = 0.8         # weight of older verifications in the smoothed acceptance rate
MAX_GAMMA = 16  # a cheap drafter at high acceptance drafts past 8 (bench/results/gamma-replay-cpu.md)


@dataclass(frozen=True)
class ForwardCost:
    """c(k) = fixed_s + per_token_s * k: one forward of a model over k query tokens (batch 1)."""
    fixed_s: float
    per_token_s: float

    def __call__(self, k: int) -> float:
        return self.fixed_s + self.per_token_s * k


def measure_costs(runners: list[Runner], slot: int, max_k: int, context: int = 64, reps: int = 5) -> list[ForwardCost]:
    """Times each model over 1 and max_k query tokens after a context-token prefix, in cache slot
    ``slot`` (left empty afterwards); medians of ``reps`` rounds after a warm-up round, each round
    timing every model in turn, so that the machine's drifting speed falls on all models alike (the
    cycle model reads their cost ratios)."""
    if max_k < 2:
        raise ValueError(f"max_k must be >= 2 (the per-token cost is the slope from 1 to max_k), got {max_k}")
    prefixes = [[i % runner.vocab_size for i in range(1, context + 1)] for runner in runners]
    for runner, prefix in zip(runners, prefixes):
        runner.truncate([slot], [0])
        runner.forward([slot], [prefix], [1])
    samples: dict[tuple[int, int], list[float]] = {(m, k): [] for m in range(len(runners)) for k in (1, max_k)}
    for round_ in range(reps + 1):
        for (m, k), times in samples.items():
            runners[m].truncate([slot], [context])
            start = time.perf_counter()
            runners[m].forward([slot], [prefixes[m][:k]], [k])
            if round_:
                times.append(time.perf_counter() - start)
    costs = []
    for m, runner in enumerate(runners):
        runner.truncate([slot], [0])
        one, many = statistics.median(samples[m, 1]), statistics.median(samples[m, max_k])
        per_token = max(0.0, (many - one) / (max_k - 1))
        costs.append(ForwardCost(one - per_token, per_token))
    return costs


class FixedGammas:
    """gamma_m drafts whenever model m proposes; each in [1, MAX_GAMMA] (the widths the engine sizes its
    CUDA graphs and cost measurements for)."""

    def __init__(self, gammas: list[int]):
        if not gammas or any(not is_int(g) or not 1 <= g <= MAX_GAMMA for g in gammas):
            raise ValueError(f"gammas must be ints in [1, {MAX_GAMMA}], got {gammas!r}")
        self.gammas = gammas
        self.max_gamma = max(gammas)

    def choose(self, m: int, acceptance: list[float], free: bool, scorers: dict[int, int], method: Method) -> int:
        """Model m's gamma (the other arguments: see ``AutoGammas.choose``)."""
        return self.gammas[m]

    def observe(self, acceptance: list[float], tested: int, accepted: int) -> None:
        """Nothing to learn: fixed lengths ignore acceptance."""


class AutoGammas:
    """The gamma maximising expected tokens per second of each proposal (module docstring)."""

    def __init__(self, costs: list[ForwardCost], max_gamma: int = MAX_GAMMA,
                 prior: tuple[float, float] = PRIOR, decay: float = DECAY):
        if not is_int(max_gamma) or not 1 <= max_gamma <= MAX_GAMMA:
            raise ValueError(f"max_gamma must be an int in [1, {MAX_GAMMA}], got {max_gamma!r}")
        if not (0 <= prior[0] <= 1 and prior[1] > 0 and 0 <= decay <= 1):
            raise ValueError(f"prior must be (mean in [0, 1], weight > 0) and decay in [0, 1], got {prior}, {decay}")
        self.costs, self.max_gamma, self.prior, self.decay = costs, max_gamma, prior, decay

    def choose(self, m: int, acceptance: list[float], free: bool, scorers: dict[int, int], method: Method) -> int:
        """The gamma of model m's next proposal.

        m: the proposer.
        acceptance: smoothed [accepted, tested] of m's drafts.
        free: whether m holds logits at the frontier (its first draft needs no forward).
        scorers: the models that score the drafts -> k_o (m among them: a member proposing in
            ensemble_sd, which feeds its last draft).
        method: the sequence's; whether a token follows a full accept at once."""
        a = self.estimate(acceptance)
        best, best_rate = 1, 0.0
        for g in range(1, self.max_gamma + 1):
            full = a ** g
            tokens = (1 - full) / (1 - a) + (full if method.extra_token_after_full_accept else 0.0)
            drafting = g - free + (m in scorers)
            seconds = drafting * self.costs[m](1) + sum(self.costs[o](k + g) for o, k in scorers.items() if o != m)
            if tokens / seconds > best_rate:
                best, best_rate = g, tokens / seconds
        return best

    def estimate(self, acceptance: list[float]) -> float:
        """The smoothed acceptance rate of discounted [accepted, tested] counts under the prior."""
        mean, weight = self.prior
        return min((acceptance[0] + mean * weight) / (acceptance[1] + weight), 0.999)

    def observe(self, acceptance: list[float], tested: int, accepted: int) -> None:
        """Folds one verification's outcome for one proposer into its discounted counts, in place."""
        acceptance[0] = self.decay * acceptance[0] + accepted
        acceptance[1] = self.decay * acceptance[1] + tested


DraftLengths = FixedGammas | AutoGammas


def cycle_rate(method: str, costs: list[ForwardCost], gammas: list[float] | None = None,
               acceptance: list[float] | None = None, order: list[int] | None = None) -> float:
    """Expected tokens per second of a two-model method at batch 1, prefill left out, when every
    draft of model m is accepted independently with probability acceptance[m] (the analytic model
    of the speculative decoding papers, with this engine's forwards). P = order[0] proposes first,
    V is the other model; a_m = acceptance[m], g_m = gammas[m], c_m(k) = costs[m](k),
    S(a, g) = sum_{j<g} a^j (accepted drafts, or the recovered token at a rejection):

        ensemble     1 token per c_P(1) + c_V(1)
        ensemble_sd  tokens  S(a_P, g_P) + a_P^g_P          (after a full accept r draws one more)
                     time    (g_P + 1) c_P(1) + c_V(g_P + 1)   (P also feeds its last draft to score it)
        ensemble_sd with a drafter D outside the two models (costs, gammas and acceptance of three
        runners, the drafter third; it proposes, order is ignored):
                     tokens  S(a_D, g_D) + a_D^g_D
                     time    g_D c_D(1) + a_D^g_D (c_D(2) - c_D(1)) + c_0(g_D + 1) + c_1(g_D + 1)
                     (D feeds its last draft with the next token, after a full accept)
        se           one cycle: P's proposal, then V's when P's is fully accepted
                     tokens  S(a_P, g_P) + a_P^g_P S(a_V, g_V)
                     time    (g_P - f) c_P(1) + c_V(g_P + 1) + a_P^g_P ((g_V - 1) c_V(1) + c_P(g_V + 1))
                     f = a_P^g_P a_V^g_V: the chance that P's first draft is free (it scored V's
                     fully accepted proposal, so it holds logits at the frontier)

    Gammas may be fractional (the mean draft length of an automatic choice)."""
    cycle = _CYCLES.get(method)
    if cycle is None:
        raise ValueError(f"unknown method {method!r}")
    if len(costs) != 2 and not (len(costs) == 3 and cycle.drafter):
        raise ValueError(f"the cycle model covers two models (and a drafter for ensemble_sd), got {len(costs)} "
                         f"for {method!r}")
    if cycle.drafts and (gammas is None or acceptance is None):
        raise ValueError(f"{method} needs gammas and acceptance rates")
    return cycle.rate(costs, gammas, acceptance, *(order or (0, 1)))


def _ensemble_rate(costs: list[ForwardCost], gammas: list[float] | None, acceptance: list[float] | None,
                   p: int, v: int) -> float:
    """cycle_rate of ensemble."""
    return 1 / (costs[p](1) + costs[v](1))


def _ensemble_sd_rate(costs: list[ForwardCost], gammas: list[float], acceptance: list[float], p: int,
                      v: int) -> float:
    """cycle_rate of ensemble_sd, with a drafter where costs has three runners."""
    if len(costs) == 3:
        d, g = 2, gammas[2]
        full = acceptance[d] ** g
        seconds = g * costs[d](1) + full * (costs[d](2) - costs[d](1)) + costs[0](g + 1) + costs[1](g + 1)
        return (_accepted(acceptance[d], g) + full) / seconds
    full_p = acceptance[p] ** gammas[p]
    tokens = _accepted(acceptance[p], gammas[p]) + full_p
    return tokens / ((gammas[p] + 1) * costs[p](1) + costs[v](gammas[p] + 1))


def _se_rate(costs: list[ForwardCost], gammas: list[float], acceptance: list[float], p: int, v: int) -> float:
    """cycle_rate of se."""
    full_p = acceptance[p] ** gammas[p]
    free = full_p * acceptance[v] ** gammas[v]
    tokens = _accepted(acceptance[p], gammas[p]) + full_p * _accepted(acceptance[v], gammas[v])
    seconds = ((gammas[p] - free) * costs[p](1) + costs[v](gammas[p] + 1)
               + full_p * ((gammas[v] - 1) * costs[v](1) + costs[p](gammas[v] + 1)))
    return tokens / seconds


def _accepted(a: float, g: float) -> float:
    """S(a, g) = sum_{j<g} a^j: the expected accepted drafts, or the recovered token at a rejection."""
    return g if a == 1 else (1 - a ** g) / (1 - a)


class _Cycle(NamedTuple):
    """A method's cycle model: its rate(costs, gammas, acceptance, p, v), whether it also covers a
    drafter outside the two models, and whether it drafts (and so needs gammas and acceptance)."""
    rate: Callable[[list[ForwardCost], list[float] | None, list[float] | None, int, int], float]
    drafter: bool
    drafts: bool


_CYCLES = {"ensemble": _Cycle(_ensemble_rate, drafter=False, drafts=False),
           "ensemble_sd": _Cycle(_ensemble_sd_rate, drafter=True, drafts=True),
           "se": _Cycle(_se_rate, drafter=False, drafts=True)}
