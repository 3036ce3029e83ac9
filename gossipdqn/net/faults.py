"""Injected faults: which outbound messages a partition cuts or a drop rule drops, and delays."""

from __future__ import annotations

import random

from gossipdqn.config import FaultsConfig
from gossipdqn.partition import parse_partition


class FaultInjector:
    """Decides, per outbound message, whether it drops and when it is due."""

    def __init__(self, faults: FaultsConfig, rank: int, seed: int = 0) -> None:
        self.rank = rank
        self.delay_s = faults.delay_ms / 1000.0
        self.drop_prob = faults.drop_prob
        self.partitions = tuple(parse_partition(e) for e in faults.partition)
        self._rng = random.Random(f"gossipdqn-faults-{seed}-{rank}")

    def drop_reason(self, peer: int, elapsed_s: float) -> str | None:
        """'partition', 'fault_drop' or None (deliver); callers serialize calls (shared RNG)."""
        if any(p.cuts(self.rank, peer, elapsed_s) for p in self.partitions):
            return "partition"
        if self.drop_prob > 0 and self._rng.random() < self.drop_prob:
            return "fault_drop"
        return None
