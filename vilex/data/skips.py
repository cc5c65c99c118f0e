"""skips.py — ``SkipCounter``: how many samples were skipped, by reason (see ``decode.SKIP_REASONS``).

Counts only; the loader decides what to log. Reasons are always listed in alphabetical order so
messages and summaries are reproducible: ``"5 skipped (empty=3, truncated=2)"``.
"""
from __future__ import annotations

from collections import Counter

from vilex.data.decode import SKIP_REASONS


class SkipCounter:
    """Skipped-sample counts by reason; saved and restored with the loader's state."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self._counts: Counter[str] = Counter()
        for reason, count in (counts or {}).items():
            self.add(reason, count)

    def add(self, reason: str, count: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        self._counts[reason] += count

    @property
    def counts(self) -> dict[str, int]:
        """``{reason: count}`` for every reason seen, alphabetical."""
        return {reason: self._counts[reason] for reason in sorted(self._counts) if self._counts[reason]}

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def describe(self) -> str:
        """``"5 skipped (empty=3, truncated=2)"``, or ``"0 skipped"``."""
        if not self.total:
            return "0 skipped"
        parts = ", ".join(f"{reason}={count}" for reason, count in self.counts.items())
        return f"{self.total} skipped ({parts})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkipCounter) and self.counts == other.counts

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts})"
