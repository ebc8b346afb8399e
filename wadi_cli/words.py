"""Counted nouns in messages, in one place: ``plural(1, "image")`` is ``"1 image"``."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``"{n:,} {noun}"`` with the noun in the plural unless ``n`` is 1 (``many``: an
    irregular plural; default ``noun + "s"``)."""
    return f"{n:,} {noun if n == 1 else (many or noun + 's')}"
