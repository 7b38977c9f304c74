"""Prefix caching across requests: idle cache slots that keep a finished sequence's KV entries.

Terms:
    cached slot  a slot no sequence uses whose runners still hold the cache entries of the committed
                 tokens of the sequence that last used it (finished or aborted)
    entry        what the cache records of a cached slot (``Entry``): those tokens, and per runner
                 how many of them its slot holds and its write count of the slot (``Runner.writes``)
    held         the entries of an entry's tokens that runner m still holds: the recorded count,
                 capped by the slot's length, or 0 once m wrote into the slot again (another engine on
                 the same models, the cost measurement of gammas="auto"): then they may be overwritten
    hit          a new request takes a cached slot over (``Hit``): each runner of its target keeps
                 the held entries of the longest common prefix of the entry's tokens and the prompt,
                 less the prompt's last token (whose logits the first draw needs), truncated in
                 place, O(1); the request prefills only the rest

A slot is in one state at a time: running (a sequence's), cached, or empty. A request takes the
cached slot of its longest hit, else an empty slot, else the least recently cached slot, evicted:
the cache holds only slots nobody uses, so it costs no memory and never evicts a running sequence.
Exact where the forward is batch-invariant: an entry is then bitwise the one a prefill computes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .runner import Runner


@dataclass(frozen=True)
class Entry:
    """A cached slot's record."""
    tokens: tuple[int, ...]  # the committed tokens of the sequence that used the slot
    rows: tuple[int, ...]    # per runner: leading tokens whose cache entries the slot held
    writes: tuple[int, ...]  # per runner: its write count of the slot then


@dataclass(frozen=True)
class Hit:
    """The plan of a take-over: the slot, and per runner the entries it keeps (0 outside the target)."""
    slot: int
    reuse: tuple[int, ...]


class PrefixCache:
    """The cached slots of one scheduler's runners, least recently cached first (see the module
    docstring). enabled=False: nothing is ever cached, every slot is emptied when it is freed."""

    def __init__(self, runners: Sequence[Runner], enabled: bool = True):
        self.runners, self.enabled = list(runners), enabled
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # slot -> entry

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, slot: int, tokens: Sequence[int]) -> bool:
        """Records a freed slot whose runners hold entries of ``tokens`` (a prefix each, at most);
        returns whether it is cached (False: disabled, the caller empties it)."""
        if not self.enabled:
            return False
        rows = tuple(min(r.lengths[slot], len(tokens)) for r in self.runners)
        self.entries[slot] = Entry(tuple(tokens), rows, tuple(r.writes[slot] for r in self.runners))
        return True

    def lookup(self, prompt: Sequence[int], runners: Sequence[int]) -> Hit | None:
        """The cached slot that keeps the most entries of ``prompt`` (the runners of its target,
        ``runners``, summed; ties: the most recently cached), or None where none keeps any."""
        best, best_total = None, 0
        for slot, entry in reversed(self.entries.items()):
            shared = _common_prefix(entry.tokens, prompt, len(prompt) - 1)
            reuse = tuple(min(shared, self.held(slot, entry, m)) if m in runners else 0
                          for m in range(len(self.runners)))
            if sum(reuse) > best_total:
                best, best_total = Hit(slot, reuse), sum(reuse)
        return best

    def held(self, slot: int, entry: Entry, m: int) -> int:
        """How many of entry's tokens runner m's slot still holds (0 once m wrote into it again)."""
        runner = self.runners[m]
        return min(entry.rows[m], runner.lengths[slot]) if runner.writes[slot] == entry.writes[m] else 0

    def take(self, slot: int) -> None:
        """The slot leaves the cache: a request takes it over."""
        del self.entries[slot]

    def evict(self) -> int:
        """Drops the least recently cached slot; returns it."""
        slot, _ = self.entries.popitem(last=False)
        return slot


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most ``limit``."""
    n = 0
    for x, y in zip(a, b):
        if n == limit or x != y:
            break
        n += 1
    return n
