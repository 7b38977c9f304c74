"""Type tests shared by the argument checks. A bool is an int to Python, but never a count, a
token id, a seed or a temperature here: ``top_k=True`` is a mistake to refuse, not a 1."""

from __future__ import annotations


def is_int(x: object) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)
