"""Replay of stacked image frames that stores each frame once and rebuilds stacks at sampling.

A transition holds two frame ids (absolute write counts): the newest frame of its observation
and of its n-step next observation. Every stored frame points to the frame before it in its
stream (-1 at an episode start), so a stack of S frames is the frame plus S - 1 hops back; hops
past an episode start give the zero frames the environment pads with. The ring of frames holds
`capacity * (1 + 1/16)` frames: one per env step plus the first frame of every episode and the
final frame of every episode (the 1/16 covers them for episodes longer than ~32 steps). For
Atari, 1M transitions take 1.06M x 84 x 84 bytes = 7.5 GB of frames, plus 36 bytes of ids,
action, return and discount each, instead of 56 GB for whole obs and next_obs stacks.

The node's own actors feed whole vector steps (`add_steps`), so each step stores one new frame;
transitions from peers (`add`) arrive as whole stacks and cost up to 2 S frames each. A sampled
transition whose frames the ring has overwritten is drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gossipdqn.config import ReplayConfig
from gossipdqn.dqn.actors import NStepAccumulator
from gossipdqn.dqn.envs import is_frame_stack
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.types import EnvSpec, SampledBatch, Transitions, VectorStep

_RESAMPLE_TRIES = 8


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
        self.written = 0
        self.streams: dict[int, _Stream] = {}

    stores_frames = True

    def add_step(
        self, stream: int, transitions: Transitions | None, step: VectorStep | None
    ) -> np.ndarray:
        """Store one vector step of `stream` from its raw `step` (or whole `transitions`)."""
        if step is None:
            return super().add_step(stream, transitions, step)
        return self.add_steps(stream, step)

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
        return super().add(ids)

    def add(self, batch: Transitions) -> np.ndarray:
        """Store whole transitions (from peers): their stacks' frames, then the ids."""
        obs_ids = self._write_stacks(np.asarray(batch.obs))
        next_ids = self._write_stacks(np.asarray(batch.next_obs))
        _, actions, rewards, _, discounts = batch  # Transitions.__len__ breaks _replace
        return super().add(Transitions(obs_ids, actions, rewards, next_ids, discounts))

    def _write(self, frames: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """Append frames with their predecessors' ids; returns their ids."""
        ids = self.written + np.arange(len(frames))
        self.frames[ids % self.frame_capacity] = frames
        self.prev[ids % self.frame_capacity] = prev
        self.written += len(frames)
        return ids

    def _write_stacks(self, stacks: np.ndarray) -> np.ndarray:
        """Append whole stacks as chains, leaving out leading all-zero (padding) frames."""
        k = len(stacks)
        blank = ~stacks.reshape(k, self.stack, self.frames[0].size).any(axis=2)
        blank[:, -1] = False
        keep = ~np.cumprod(blank, axis=1).astype(bool)
        ids = np.full((k, self.stack), -1, dtype=np.int64)
        ids[keep] = self.written + np.arange(int(keep.sum()))
        prev = np.concatenate([np.full((k, 1), -1), ids[:, :-1]], axis=1)
        self._write(stacks[keep], prev[keep])
        return ids[:, -1]

    def stacks(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stacks ending at frame `ids`, and whether all their frames are still stored."""
        out = np.zeros((len(ids), self.stack, *self.frames.shape[1:]), dtype=np.uint8)
        floor = self.written - self.frame_capacity
        live = ids >= floor
        ids = np.asarray(ids, dtype=np.int64)
        for depth in range(self.stack - 1, -1, -1):
            present = ids >= 0
            live &= ~present | (ids >= floor)
            slots = ids[present] % self.frame_capacity
            out[present, depth] = self.frames[slots]
            ids = np.where(present, self.prev[ids % self.frame_capacity], -1)
        return out, live

    def sample(self, batch_size: int, beta: float = 1.0) -> SampledBatch:
        """A batch as `ReplayBuffer.sample` gives it, with stacks rebuilt from stored frames."""
        batch = super().sample(batch_size, beta)
        obs, live = self.stacks(batch.obs)
        for _ in range(_RESAMPLE_TRIES):
            if live.all():
                break
            self._forget(batch.indices[~live])
            again = super().sample(int((~live).sum()), beta)
            batch = _replace_rows(batch, ~live, again)
            obs, live = self.stacks(batch.obs)
        next_obs, _ = self.stacks(batch.next_obs)
        return batch._replace(obs=obs, next_obs=next_obs)

    def _forget(self, slots: np.ndarray) -> None:
        """Transitions whose frames are gone are never drawn again by prioritized sampling."""
        if self.tree is not None:
            self.tree.set(np.unique(slots), np.zeros(len(np.unique(slots))))

    def _gather(self, slots: np.ndarray) -> Transitions:
        obs_ids, actions, rewards, next_ids, discounts = super()._gather(slots)
        obs, next_obs = self.stacks(obs_ids)[0], self.stacks(next_ids)[0]
        return Transitions(obs, actions, rewards, next_obs, discounts)

    def state_dict(self) -> dict:
        """Transition ids and counters as `ReplayBuffer` keeps them, plus the frame ring."""
        state = super().state_dict()
        state |= {"frames": self.frames.copy(), "prev": self.prev.copy(), "written": self.written}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore frames and transitions; open streams start afresh at their next step."""
        super().load_state_dict(state)
        self.frames[:] = state["frames"]
        self.prev[:] = state["prev"]
        self.written = int(state["written"])
        self.streams.clear()


def _replace_rows(batch: SampledBatch, rows: np.ndarray, other: SampledBatch) -> SampledBatch:
    """`batch` with the `rows` taken, in order, from `other`."""
    fields = []
    for mine, theirs in zip(batch, other):
        mine = mine.copy()
        mine[rows] = theirs
        fields.append(mine)
    return SampledBatch(*fields)


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
