"""Replay of stacked image frames that stores each frame once and rebuilds stacks at sampling.

A transition holds two frame ids (absolute write counts): the newest frame of its observation
and of its n-step next observation. Every stored frame points to the frame before it in its
stream (-1 at an episode start), so a stack of S frames is the frame plus S - 1 hops back; hops
past an episode start give the zero frames the environment pads with. The ring of frames holds
`capacity * (1 + 1/16)` frames: one per env step plus the first frame of every episode and the
final frame of every episode (the 1/16 covers them for episodes longer than ~32 steps). For
Atari, 1M transitions take 1.06M x 84 x 84 bytes = 7.5 GB of frames, plus 16 bytes of links per
frame and 32 bytes of ids, action, return and discount per transition, instead of 56 GB for
whole obs and next_obs stacks.

The node's own actors feed whole vector steps (`add_steps`), so each step stores one new frame.
Transitions from peers (`add`) arrive as whole stacks; a stack that continues another of the
same batch (a peer's consecutive steps, a next obs) costs one frame, any other up to S. Where
peers send more frames than the ring holds, it runs out before the ring of transitions, and
every sample stays exact all the same: a transition lives only while the oldest frame it needs
is stored. When the ring overwrites a frame, the transitions that need it go, with every older
one, so the live transitions stay the newest keys of the transition ring (`ReplayBuffer.size`
of them) and nothing else is sampled, shared or updated. `last_user` maps each stored frame to
the newest transition whose oldest frame it is, which makes that one lookup per frame written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gossipdqn.config import ReplayConfig
from gossipdqn.dqn.actors import NStepAccumulator
from gossipdqn.dqn.envs import is_frame_stack
from gossipdqn.dqn.replay import ReplayBuffer, locked
from gossipdqn.types import EnvSpec, SampledBatch, Transitions, VectorStep

_HASH_WEIGHTS = np.random.default_rng(0).integers(1, 2**63, 1 << 16, dtype=np.uint64) | 1
"""Odd multipliers of the 8-byte words of a frame (up to 512 KiB) in `_labels`' hash."""


@dataclass
class _Stream:
    """One source of vector steps: the frame id of each env's current observation."""

    current: np.ndarray
    nstep: NStepAccumulator


class FrameReplay(ReplayBuffer):
    """`ReplayBuffer` whose transitions name frame ids; `sample` and friends rebuild stacks."""

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        *,
        n_step: int,
        gamma: float,
        prioritized: bool = False,
        alpha: float = 0.6,
        priority_eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        super().__init__(
            capacity, (), np.dtype(np.int64), prioritized=prioritized, alpha=alpha,
            priority_eps=priority_eps, seed=seed,
        )  # fmt: skip
        self.stack, *frame_shape = obs_shape
        self.n_step, self.gamma = n_step, gamma
        self.frame_capacity = capacity + capacity // 16 + 4 * self.stack
        self.frames = np.zeros((self.frame_capacity, *frame_shape), dtype=np.uint8)
        self.prev = np.full(self.frame_capacity, -1, dtype=np.int64)
        self.last_user = np.full(self.frame_capacity, -1, dtype=np.int64)
        self.written = 0
        self.streams: dict[int, _Stream] = {}

    stores_frames = True

    @locked
    def add_step(
        self, stream: int, transitions: Transitions | None, step: VectorStep | None
    ) -> np.ndarray:
        """Store one vector step of `stream` from its raw `step` (or whole `transitions`)."""
        if step is None:
            return super().add_step(stream, transitions, step)
        return self.add_steps(stream, step)

    @locked
    def add_steps(self, stream: int, step: VectorStep) -> np.ndarray:
        """Store one vector step of `stream` (one frame per env); returns the slots written."""
        state = self.streams.get(stream)
        if state is None:
            ids = EnvSpec((), np.dtype(np.int64), 0)
            nstep = NStepAccumulator(len(step.actions), self.n_step, self.gamma, ids)
            state = self.streams[stream] = _Stream(self._write_stacks(step.obs), nstep)
        valid = np.asarray(step.valid, dtype=bool)
        following = np.empty_like(state.current)
        following[valid] = self._write(step.next_obs[valid, -1], state.current[valid])
        following[~valid] = self._write_stacks(step.next_obs[~valid])
        ids = state.nstep.push(
            state.current, step.actions, step.rewards, following,
            step.terminated, step.truncated, valid,
        )  # fmt: skip
        state.current = following
        return self._add_ids(ids)

    @locked
    def add(self, batch: Transitions) -> np.ndarray:
        """Store whole transitions (from peers): their stacks' frames, then the ids."""
        ids = self._write_stacks(np.concatenate([batch.obs, batch.next_obs]))
        obs_ids, next_ids = ids[: len(batch)], ids[len(batch) :]
        _, actions, rewards, _, discounts = batch  # Transitions.__len__ breaks _replace
        return self._add_ids(Transitions(obs_ids, actions, rewards, next_ids, discounts))

    def _add_ids(self, ids: Transitions) -> np.ndarray:
        """Store transitions of frame ids in the ring; returns their slots."""
        slots = super().add(ids)
        keys = self.added - len(slots) + np.arange(len(slots))
        self._track(keys, self.obs[slots], self.next_obs[slots])
        return slots

    def _track(self, keys: np.ndarray, obs_ids: np.ndarray, next_ids: np.ndarray) -> None:
        """Note each transition as a user of its oldest frame; drop those already without it."""
        oldest = np.minimum(self._oldest(obs_ids), self._oldest(next_ids))
        stored = oldest >= self.written - self.frame_capacity
        np.maximum.at(self.last_user, oldest[stored] % self.frame_capacity, keys[stored])
        if not stored.all():
            self._drop_through(int(keys[~stored].max()))

    def _oldest(self, ids: np.ndarray) -> np.ndarray:
        """The oldest frame id in each stack ending at `ids`; below the floor if one is gone."""
        floor = self.written - self.frame_capacity
        oldest = ids = np.asarray(ids, dtype=np.int64)
        for _ in range(self.stack - 1):
            ids = np.where(ids >= floor, self.prev[ids % self.frame_capacity], -1)
            oldest = np.where(ids >= 0, np.minimum(oldest, ids), oldest)
        return oldest

    def _drop_through(self, key: int) -> None:
        """Transitions up to `key` are no longer live (their frames are, or will be, gone)."""
        keep = min(self.size, self.added - 1 - key)
        if keep < self.size:
            dropped = self.live_slots()[: self.size - keep]
            self.size = keep
            if self.tree is not None:
                self.tree.set(dropped, np.zeros(len(dropped)))

    def _write(self, frames: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """Append frames with their predecessors' ids, dropping the transitions that needed the
        frames they overwrite; returns their ids."""
        ids = self.written + np.arange(len(frames))
        slots = ids % self.frame_capacity
        last_user = int(self.last_user[slots].max(initial=-1))
        self.last_user[slots] = -1
        self.frames[slots] = frames
        self.prev[slots] = prev
        self.written += len(frames)
        if last_user >= 0:
            self._drop_through(last_user)
        return ids

    def _write_stacks(self, stacks: np.ndarray) -> np.ndarray:
        """Append whole stacks; returns the id of each stack's newest frame.

        A distinct stack whose older S - 1 frames are another's newer S - 1 (a stream's next
        step, or the next obs n steps on) costs one frame, linked to that one's newest frame;
        any other is a chain of its frames, leading all-zero (padding) ones left out. Walking
        S - 1 hops back gives every stack again, whichever match is taken.
        """
        if len(stacks) == 0:
            return np.zeros(0, dtype=np.int64)
        flat = np.asarray(stacks).reshape(len(stacks), self.stack, self.frames[0].size)
        labels = _labels(flat.reshape(-1, flat.shape[2])).reshape(len(flat), self.stack)
        _, first, which = np.unique(labels, axis=0, return_index=True, return_inverse=True)
        distinct = flat[first]
        parent = _continued(labels[first])
        chains = distinct[parent < 0]
        blank = ~chains.any(axis=2)
        blank[:, -1] = False
        keep = ~np.cumprod(blank, axis=1).astype(bool)
        chain_ids = np.full(keep.shape, -1, dtype=np.int64)
        chain_ids[keep] = self.written + np.arange(int(keep.sum()))
        ids = np.empty(len(distinct), dtype=np.int64)
        ids[parent < 0] = chain_ids[:, -1]
        ids[parent >= 0] = self.written + int(keep.sum()) + np.arange(int((parent >= 0).sum()))
        prev = np.concatenate([np.full((len(chains), 1), -1), chain_ids[:, :-1]], axis=1)
        frames = np.concatenate([chains[keep], distinct[parent >= 0, -1]])
        self._write(frames.reshape(-1, *self.frames.shape[1:]),
                    np.concatenate([prev[keep], ids[parent[parent >= 0]]]))  # fmt: skip
        return ids[which.ravel()]

    def stacks(self, ids: np.ndarray) -> np.ndarray:
        """The stacks ending at frame `ids` (of live transitions: all their frames are stored).

        The hops back run on the ids alone; the frames are then gathered in one pass (half the
        time of a masked copy per depth at batch 512), and slots past an episode start zeroed.
        """
        chain = np.empty((len(ids), self.stack), dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        for depth in range(self.stack - 1, -1, -1):
            chain[:, depth] = ids
            ids = np.where(ids >= 0, self.prev[ids % self.frame_capacity], -1)
        out = self.frames[np.where(chain >= 0, chain % self.frame_capacity, 0)]
        out[chain < 0] = 0
        return out

    @locked
    def sample(self, batch_size: int, beta: float = 1.0) -> SampledBatch:
        """A batch as `ReplayBuffer.sample` gives it, with stacks rebuilt from stored frames."""
        batch = super().sample(batch_size, beta)
        return batch._replace(obs=self.stacks(batch.obs), next_obs=self.stacks(batch.next_obs))

    def _gather(self, slots: np.ndarray) -> Transitions:
        obs_ids, actions, rewards, next_ids, discounts = super()._gather(slots)
        return Transitions(self.stacks(obs_ids), actions, rewards, self.stacks(next_ids), discounts)

    @locked
    def state_dict(self) -> dict:
        """Transition ids and counters as `ReplayBuffer` keeps them, plus the frame ring."""
        state = super().state_dict()
        state |= {"frames": self.frames.copy(), "prev": self.prev.copy(), "written": self.written}
        return state

    @locked
    def load_state_dict(self, state: dict) -> None:
        """Restore frames and transitions; open streams start afresh at their next step."""
        super().load_state_dict(state)
        self.frames[:] = state["frames"]
        self.prev[:] = state["prev"]
        self.written = int(state["written"])
        self.streams.clear()
        self.last_user[:] = -1
        live, keys = self.live_slots(), self.added - self.size + np.arange(self.size)
        self._track(keys, self.obs[live], self.next_obs[live])


def _labels(rows: np.ndarray) -> np.ndarray:
    """A label for each row of bytes, the same exactly where the rows are equal (a 64-bit hash,
    checked; on a collision every row gets a label of its own)."""
    if rows.shape[1] % 8:
        rows = np.pad(rows, ((0, 0), (0, -rows.shape[1] % 8)))
    words = np.ascontiguousarray(rows).view(np.uint64)
    _, first, labels = np.unique(words @ _HASH_WEIGHTS[: words.shape[1]], return_index=True,
                                 return_inverse=True)  # fmt: skip
    labels = labels.ravel()
    shared = np.flatnonzero(first[labels] != np.arange(len(rows)))
    if not np.array_equal(words[shared], words[first[labels[shared]]]):
        return np.arange(len(rows))
    return labels


def _continued(stacks: np.ndarray) -> np.ndarray:
    """For each stack (of frame labels), one whose newer S - 1 frames are its older S - 1 (-1
    where none is)."""
    n = len(stacks)
    _, keys = np.unique(
        np.concatenate([stacks[:, 1:], stacks[:, :-1]]), axis=0, return_inverse=True
    )
    keys = keys.ravel()
    owner = np.full(2 * n, -1, dtype=np.int64)
    owner[keys[:n]] = np.arange(n)
    return owner[keys[n:]]


def make_replay(cfg: ReplayConfig, spec: EnvSpec, *, gamma: float, seed: int) -> ReplayBuffer:
    """A frame replay for stacked frames (replay.storage auto or frames), else a `ReplayBuffer`."""
    frames = cfg.storage == "frames" or (cfg.storage == "auto" and is_frame_stack(spec))
    if frames and not is_frame_stack(spec):
        raise ValueError(
            f"replay.storage: frames needs uint8 (stack, H, W) observations, got {spec.obs_shape}"
        )
    common = {"prioritized": cfg.prioritized, "alpha": cfg.alpha, "seed": seed}
    common["priority_eps"] = cfg.priority_eps
    if frames:
        return FrameReplay(cfg.capacity, spec.obs_shape, n_step=cfg.n_step, gamma=gamma, **common)
    return ReplayBuffer(cfg.capacity, spec.obs_shape, spec.obs_dtype, **common)
