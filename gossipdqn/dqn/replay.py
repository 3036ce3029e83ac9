"""Experience replay: a preallocated numpy ring buffer, uniform or proportional-prioritized.

Every transition gets a key, its write count: slot `key % capacity` holds it until the ring
comes round again. The live transitions are the `size` newest keys; `FrameReplay` drops the
oldest of them early when their frames are gone. Each public method holds the buffer's own
lock, so actors, a peer's experience and the prefetch thread may call it from any thread.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from gossipdqn.types import SampledBatch, Transitions, VectorStep

_FIELDS = ("obs", "actions", "rewards", "next_obs", "discounts")

_Method = TypeVar("_Method", bound=Callable[..., Any])


def locked(method: _Method) -> _Method:
    """Run `method` holding the buffer's lock (re-entrant: locked methods call each other)."""

    @functools.wraps(method)
    def run(self: ReplayBuffer, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


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
        """Leaf index whose prefix-sum interval holds each value in [0, total).

        Never a zero leaf while the total is positive: a subtree of sum 0 is never entered, also
        where rounding leaves a value at or past the end of its interval.
        """
        if self.total <= 0:
            raise ValueError("sum tree: no leaf has a positive priority")
        pos = np.ones(len(values), dtype=np.int64)
        values = np.array(values, dtype=np.float64)
        while pos[0] < self.leaves:
            left = 2 * pos
            left_sum = self.nodes[left]
            go_right = (values >= left_sum) & (self.nodes[left + 1] > 0)
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
        if not priority_eps > 0:
            raise ValueError(f"priority_eps: expected a value > 0, got {priority_eps}")
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
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return self.size

    stores_frames = False
    """Whether the buffer stores raw vector steps' frames (`FrameReplay`) or whole transitions."""

    @property
    def prioritized(self) -> bool:
        return self.tree is not None

    @locked
    def add_step(
        self, stream: int, transitions: Transitions | None, step: VectorStep | None
    ) -> np.ndarray:
        """Store what one vector step of actor `stream` produced; returns the slots written.

        This buffer takes the step's n-step `transitions`; `FrameReplay` takes the raw `step`.
        """
        if transitions is None:
            return np.zeros(0, dtype=np.int64)
        return self.add(transitions)

    @locked
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

    def live_slots(self) -> np.ndarray:
        """The slots of the live transitions, oldest first."""
        return (self.pos - self.size + np.arange(self.size)) % self.capacity

    def _holds(self, slots: np.ndarray, before: int) -> np.ndarray:
        """Whether each slot holds a live transition written before write count `before`."""
        key = self.added - 1 - (self.added - 1 - slots) % self.capacity
        return (key >= self.added - self.size) & (key < before)

    @locked
    def sample(self, batch_size: int, beta: float = 1.0) -> SampledBatch:
        """Uniform, or proportional to priority^alpha with importance weights (N P(i))^-beta."""
        if self.size == 0:
            raise ValueError("replay is empty: add transitions before sampling")
        if self.tree is None:
            offsets = self.rng.integers(0, self.size, size=batch_size)
            indices = (self.pos - self.size + offsets) % self.capacity
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
            self.added,
            indices,
        )

    def _sample_prioritized(self, batch_size: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
        assert self.tree is not None
        total = self.tree.total
        edges = np.arange(batch_size) * (total / batch_size)
        values = edges + self.rng.random(batch_size) * (total / batch_size)
        indices = self.tree.find(np.minimum(values, np.nextafter(total, 0)))
        probs = self.tree.get(indices) / total
        weights = (self.size * probs) ** (-beta)
        return indices, (weights / weights.max()).astype(np.float32)

    @locked
    def update_priorities(
        self, indices: np.ndarray, td_errors: np.ndarray, sampled_at: int | None = None
    ) -> None:
        """Priorities (|TD error| + eps)^alpha for sampled slots that still hold what was sampled.

        `sampled_at` is the batch's `SampledBatch.sampled_at`: slots
        written since keep their own priority. Without it, only live slots are updated. A no-op
        for uniform replay.
        """
        if self.tree is None:
            return
        before = self.added if sampled_at is None else sampled_at
        keep = self._holds(np.asarray(indices), before)
        if not keep.any():
            return
        errors = np.asarray(td_errors)
        if not np.isfinite(errors).all():
            bad = errors[~np.isfinite(errors)]
            raise ValueError(
                f"td_errors: {len(bad)} of {len(errors)} are not finite ({bad[0]}); a priority "
                "must be a finite number"
            )
        priorities = np.abs(errors[keep]).astype(np.float64) + self.priority_eps
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.set(np.asarray(indices)[keep], priorities**self.alpha)

    @locked
    def latest(self, n: int) -> Transitions:
        """The `n` most recently added transitions (fewer if the buffer holds fewer)."""
        n = min(n, self.size)
        return self._gather((self.pos - n + np.arange(n)) % self.capacity)

    @locked
    def transitions(self, slots: np.ndarray) -> Transitions:
        """The live transitions in `slots`, whole (to share with peers)."""
        slots = np.asarray(slots, dtype=np.int64)
        return self._gather(slots[self._holds(slots, self.added)])

    def _gather(self, slots: np.ndarray) -> Transitions:
        return Transitions(*(getattr(self, name)[slots] for name in _FIELDS))

    @locked
    def state_dict(self) -> dict:
        """Contents (every slot written so far) and counters as plain numpy arrays and ints."""
        filled = min(self.added, self.capacity)
        state = {name: getattr(self, name)[:filled].copy() for name in _FIELDS}
        state |= {"pos": self.pos, "size": self.size, "added": self.added}
        state["max_priority"] = self.max_priority
        if self.tree is not None:
            state["priorities"] = self.tree.get(np.arange(filled))
        state["rng"] = self.rng.bit_generator.state
        return state

    @locked
    def load_state_dict(self, state: dict) -> None:
        """Restore; a loaded priority is at least eps^alpha, as every priority here is."""
        size, filled = int(state["size"]), len(state["actions"])
        if max(size, filled) > self.capacity:
            raise ValueError(f"replay state holds {filled} slots, capacity is {self.capacity}")
        for name in _FIELDS:
            getattr(self, name)[:filled] = np.asarray(state[name])
        self.pos, self.size, self.added = int(state["pos"]), size, int(state["added"])
        self.max_priority = max(float(state["max_priority"]), self.priority_eps)
        if self.tree is not None:
            self.tree.nodes[:] = 0.0
            saved = np.asarray(state.get("priorities", np.ones(filled)), dtype=np.float64)
            live = self.live_slots()
            self.tree.set(live, np.maximum(saved[live], self.priority_eps**self.alpha))
        self.rng.bit_generator.state = state["rng"]
