"""Experience replay: a preallocated numpy ring buffer, uniform or proportional-prioritized."""

from __future__ import annotations

import numpy as np

from gossipdqn.types import SampledBatch, Transitions, VectorStep

_FIELDS = ("obs", "actions", "rewards", "next_obs", "discounts")


class SumTree:
    """Binary tree of priority sums over `capacity` leaves; batch update and batch search."""

    def __init__(self, capacity: int) -> None:
        self.leaves = 1 << max(0, (capacity - 1).bit_length())
        self.nodes = np.zeros(2 * self.leaves, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.nodes[indices + self.leaves]

    def set(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set leaf priorities and recompute their ancestors, one level at a time."""
        pos = np.asarray(indices, dtype=np.int64) + self.leaves
        if pos.size == 0:
            return
        self.nodes[pos] = priorities
        while pos[0] > 1:
            pos = np.unique(pos >> 1)
            self.nodes[pos] = self.nodes[2 * pos] + self.nodes[2 * pos + 1]

    def find(self, values: np.ndarray) -> np.ndarray:
        """Leaf index whose prefix-sum interval holds each value in [0, total)."""
        pos = np.ones(len(values), dtype=np.int64)
        values = np.array(values, dtype=np.float64)
        while pos[0] < self.leaves:
            left = 2 * pos
            left_sum = self.nodes[left]
            go_right = values >= left_sum
            values -= np.where(go_right, left_sum, 0.0)
            pos = left + go_right
        return pos - self.leaves


class ReplayBuffer:
    """Ring buffer of transitions; observations keep their own dtype (uint8 stays uint8)."""

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype,
        *,
        prioritized: bool = False,
        alpha: float = 0.6,
        priority_eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.pos = 0
        self.size = 0
        self.added = 0
        self.alpha = alpha
        self.priority_eps = priority_eps
        self.max_priority = 1.0
        self.tree = SumTree(capacity) if prioritized else None
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    stores_frames = False
    """Whether the buffer stores raw vector steps' frames (`FrameReplay`) or whole transitions."""

    @property
    def prioritized(self) -> bool:
        return self.tree is not None

    def add_step(
        self, stream: int, transitions: Transitions | None, step: VectorStep | None
    ) -> np.ndarray:
        """Store what one vector step of actor `stream` produced; returns the slots written.

        This buffer takes the step's n-step `transitions`; `FrameReplay` takes the raw `step`.
        """
        if transitions is None:
            return np.zeros(0, dtype=np.int64)
        return self.add(transitions)

    def add(self, batch: Transitions) -> np.ndarray:
        """Append a batch (overwriting the oldest when full); returns the slots written."""
        n = len(batch)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if n > self.capacity:
            batch = Transitions(*(a[-self.capacity :] for a in batch))
            n = self.capacity
        slots = (self.pos + np.arange(n)) % self.capacity
        for name, values in zip(_FIELDS, batch):
            getattr(self, name)[slots] = values
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)
        self.added += n
        if self.tree is not None:
            self.tree.set(slots, np.full(n, self.max_priority**self.alpha))
        return slots

    def sample(self, batch_size: int, beta: float = 1.0) -> SampledBatch:
        """Uniform, or proportional to priority^alpha with importance weights (N P(i))^-beta."""
        if self.size == 0:
            raise ValueError("replay is empty: add transitions before sampling")
        if self.tree is None:
            indices = self.rng.integers(0, self.size, size=batch_size)
            weights = np.ones(batch_size, dtype=np.float32)
        else:
            indices, weights = self._sample_prioritized(batch_size, beta)
        return SampledBatch(
            self.obs[indices],
            self.actions[indices],
            self.rewards[indices],
            self.next_obs[indices],
            self.discounts[indices],
            weights,
            indices,
        )

    def _sample_prioritized(self, batch_size: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
        assert self.tree is not None
        total = self.tree.total
        edges = np.arange(batch_size) * (total / batch_size)
        values = edges + self.rng.random(batch_size) * (total / batch_size)
        indices = np.minimum(
            self.tree.find(np.minimum(values, np.nextafter(total, 0))), self.size - 1
        )
        probs = self.tree.get(indices) / total
        weights = (self.size * probs) ** (-beta)
        return indices, (weights / weights.max()).astype(np.float32)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """New priorities |TD error| + eps for sampled slots; a no-op for uniform replay."""
        if self.tree is None:
            return
        priorities = np.abs(td_errors).astype(np.float64) + self.priority_eps
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.set(indices, priorities**self.alpha)

    def latest(self, n: int) -> Transitions:
        """The `n` most recently added transitions (fewer if the buffer holds fewer)."""
        n = min(n, self.size)
        return self._gather((self.pos - n + np.arange(n)) % self.capacity)

    def highest_priority(self, n: int) -> Transitions:
        """The `n` transitions of highest priority; the latest ones for uniform replay."""
        if self.tree is None:
            return self.latest(n)
        n = min(n, self.size)
        priorities = self.tree.get(np.arange(self.size))
        return self._gather(np.argpartition(-priorities, n - 1)[:n] if n else np.zeros(0, int))

    def transitions(self, slots: np.ndarray) -> Transitions:
        """The transitions in `slots`, whole (to share with peers)."""
        return self._gather(slots)

    def _gather(self, slots: np.ndarray) -> Transitions:
        return Transitions(*(getattr(self, name)[slots] for name in _FIELDS))

    def state_dict(self) -> dict:
        """Contents and counters as plain numpy arrays and ints."""
        state = {name: getattr(self, name)[: self.size].copy() for name in _FIELDS}
        state |= {"pos": self.pos, "size": self.size, "added": self.added}
        state["max_priority"] = self.max_priority
        if self.tree is not None:
            state["priorities"] = self.tree.get(np.arange(self.size))
        state["rng"] = self.rng.bit_generator.state
        return state

    def load_state_dict(self, state: dict) -> None:
        size = int(state["size"])
        if size > self.capacity:
            raise ValueError(f"replay state holds {size} transitions, capacity is {self.capacity}")
        for name in _FIELDS:
            getattr(self, name)[:size] = np.asarray(state[name])
        self.pos, self.size, self.added = int(state["pos"]), size, int(state["added"])
        self.max_priority = float(state["max_priority"])
        if self.tree is not None and "priorities" in state:
            self.tree.set(np.arange(size), np.asarray(state["priorities"], dtype=np.float64))
        self.rng.bit_generator.state = state["rng"]
