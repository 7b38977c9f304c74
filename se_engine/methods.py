"""The four decoding methods as policies: which action a sequence takes after each of its events.

The scheduler (``se_engine.decode``, whose module docstring defines actions, targets and proposals)
runs the actions and asks a sequence's method what comes next at three events:

    after_ensemble_draw  a token drawn from r at the frontier was committed (the first one follows
                         the prefill)
    after_proposal       the proposer's last draft of a proposal was drawn: its scoring, by
                         ``scorers`` (also asked when a proposal starts, to price its draft length)
    after_verification   the scored drafts were verified: all accepted, or one rejected

A policy reads only the sequence's target (its members and order) and cache lengths, so the next
action is a function of the sequence's past.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

ActionKind = Literal["ensemble", "draft", "score", "fork"]
ENSEMBLE, DRAFT, SCORE, FORK = "ensemble", "draft", "score", "fork"


@dataclass(frozen=True)
class Action:
    """A sequence's next action: kind, and the runner indices it runs (for FORK none)."""
    kind: ActionKind
    models: tuple[int, ...] = ()


class Roles(Protocol):
    """What a policy reads of a target: ``se_engine.decode.Target``, named by a protocol because
    se_engine.decode imports this module."""

    @property
    def members(self) -> tuple[int, ...]:
        """The runners r is defined over."""
        ...

    @property
    def order(self) -> tuple[int, ...]:
        """Runner indices, first proposes first."""
        ...


class Method:
    """A decoding method; each subclass answers the questions its sequences raise.

    extra_token_after_full_accept: after every draft of a proposal is accepted, a token is drawn
    from r at once (every scorer holds logits at the frontier): the automatic draft length counts it.
    """
    name: ClassVar[str]
    extra_token_after_full_accept: ClassVar[bool] = False

    def after_ensemble_draw(self, target: Roles) -> Action:
        """The action after a token drawn from r; target: the sequence's."""
        raise NotImplementedError

    def scorers(self, target: Roles, proposer: int, fed: Sequence[int]) -> tuple[int, ...]:
        """Who scores a proposal.

        target: the sequence's.
        proposer: the runner that drafts it.
        fed: the sequence's cache length in each runner."""
        raise NotImplementedError

    def after_proposal(self, target: Roles, proposer: int, fed: Sequence[int]) -> Action:
        """The action after a proposal's last draft (arguments as for ``scorers``): its scoring."""
        return Action(SCORE, self.scorers(target, proposer, fed))

    def after_verification(self, target: Roles, scorers: tuple[int, ...], rejected: bool) -> Action:
        """The action after a verification.

        target: the sequence's.
        scorers: the models that scored the verified drafts.
        rejected: whether a draft was rejected (else all were accepted)."""
        raise NotImplementedError


class Ensemble(Method):
    """Every token drawn from r, every model feeding each one: no drafts, so nobody scores."""
    name = "ensemble"

    def after_ensemble_draw(self, target: Roles) -> Action:
        return Action(ENSEMBLE, target.members)


class Single(Ensemble):
    """One model decoding alone: the ensemble of that one model."""
    name = "single"


class EnsembleSD(Method):
    """Speculative decoding of the ensemble by one fixed proposer P = order[0] (the cheapest model,
    or a drafter outside the members). Every member scores P's drafts (P too, when a member: its
    last draft), so after a full accept every member holds logits at the frontier and the next token
    is drawn from r in the same tick; then P proposes again, as after a rejection."""
    name = "ensemble_sd"
    extra_token_after_full_accept = True

    def after_ensemble_draw(self, target: Roles) -> Action:
        return Action(DRAFT, target.order[:1])

    def scorers(self, target: Roles, proposer: int, fed: Sequence[int]) -> tuple[int, ...]:
        return target.members

    def after_verification(self, target: Roles, scorers: tuple[int, ...], rejected: bool) -> Action:
        return Action(DRAFT, target.order[:1]) if rejected else Action(ENSEMBLE, target.members)


class SE(Method):
    """Speculative ensemble decoding: the models take turns proposing for one another.

    The model that has waited longest scores a proposal: of the models other than the proposer, the
    one whose cache lags furthest behind (ties: the first in order), so every model keeps up. After
    a full accept the scorer proposes: it holds logits at the frontier, so its first draft costs no
    forward. After a rejection the cheapest model (order[0]) proposes.
    """
    name = "se"

    def after_ensemble_draw(self, target: Roles) -> Action:
        return Action(DRAFT, target.order[:1])

    def scorers(self, target: Roles, proposer: int, fed: Sequence[int]) -> tuple[int, ...]:
        return (min((m for m in target.order if m != proposer), key=lambda m: fed[m]),)

    def after_verification(self, target: Roles, scorers: tuple[int, ...], rejected: bool) -> Action:
        return Action(DRAFT, target.order[:1] if rejected else scorers[:1])


POLICIES: dict[str, Method] = {m.name: m for m in (Single(), Ensemble(), EnsembleSD(), SE())}
METHODS = tuple(POLICIES)  # the method names, as the Engine takes them
