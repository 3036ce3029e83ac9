"""Network partitions as `faults.partition` writes them: parsing and the cut rule, no I/O.

Ground level, so that config.py can validate the setting without importing the network layer.
"""

from __future__ import annotations

from dataclasses import dataclass

_EXPECTED = "expected 'START-END:a,b|c,d' (seconds since start, END > START, ranks in >= 2 groups)"


@dataclass(frozen=True)
class Partition:
    """Between `start` and `end` seconds, ranks in different groups cannot talk."""

    start: float
    end: float
    groups: tuple[frozenset[int], ...]

    def cuts(self, a: int, b: int, elapsed_s: float) -> bool:
        """Whether a message from `a` to `b` is cut at `elapsed_s`; unlisted ranks are never cut."""
        if not self.start <= elapsed_s < self.end:
            return False
        group_a = next((i for i, g in enumerate(self.groups) if a in g), None)
        group_b = next((i for i, g in enumerate(self.groups) if b in g), None)
        return group_a is not None and group_b is not None and group_a != group_b


def _parse_window(entry: str, window: str) -> tuple[float, float]:
    start_text, sep, end_text = window.partition("-")
    try:
        start, end = float(start_text), float(end_text)
    except ValueError:
        raise ValueError(
            f"faults.partition {entry!r}: bad window {window!r}; {_EXPECTED}"
        ) from None
    if not sep or start < 0 or end <= start:
        raise ValueError(f"faults.partition {entry!r}: bad window {window!r}; {_EXPECTED}")
    return start, end


def _parse_groups(entry: str, text: str) -> tuple[frozenset[int], ...]:
    try:
        groups = tuple(frozenset(int(r) for r in g.split(",")) for g in text.split("|"))
    except ValueError:
        raise ValueError(f"faults.partition {entry!r}: bad ranks {text!r}; {_EXPECTED}") from None
    ranks = [r for g in groups for r in g]
    if len(groups) < 2 or len(set(ranks)) != len(ranks) or min(ranks) < 0:
        raise ValueError(
            f"faults.partition {entry!r}: groups must be >= 2, disjoint, ranks >= 0; {_EXPECTED}"
        )
    return groups


def parse_partition(entry: str) -> Partition:
    """Parse one `START-END:a,b|c,d` entry, raising ValueError that names it."""
    window, sep, groups = entry.replace(" ", "").partition(":")
    if not sep:
        raise ValueError(f"faults.partition {entry!r}: missing ':'; {_EXPECTED}")
    start, end = _parse_window(entry, window)
    return Partition(start, end, _parse_groups(entry, groups))
