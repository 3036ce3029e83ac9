"""Checks on a decoded peer message against our own model and environment; no I/O.

`decode` has already bounded sizes, whitelisted dtypes and refused NaN and Inf; here a message
must also match what this node holds (parameter count, observation shape and dtype, action
count) and stay within sane bounds, so nothing hostile reaches a model or a replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gossipdqn.net.wire import Message
from gossipdqn.types import EnvSpec

MAX_SHARED_TRANSITIONS = 65_536
"""Largest experience batch accepted from a peer."""
MAX_ABS_REWARD = 1e6
"""Rewards beyond this magnitude in a peer's experience are rejected as hostile."""
MAX_ABS_PARAM = 1e6
"""Parameters beyond this magnitude in a peer's message are rejected as hostile."""
MAX_ABS_OBS = 1e6
"""Where the observation space is unbounded, shared observations must stay within this."""
EXPERIENCE_FIELDS = frozenset({"obs", "actions", "rewards", "next_obs", "discounts"})


class Rejected(Exception):
    """A message that passed the codec but not the protocol; `reason` is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ObsBounds:
    """The observation space's box widened by its own width on each side, every side capped at
    MAX_ABS_OBS. A declared box is a hint that envs overshoot (gymnasium's LunarLander climbs to
    y = 5.3 against a declared 2.5 when it fires its main engine; its height is unbounded), and
    refusing a peer's honest share for it loses experience the sender itself trains on."""

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        width = np.where(np.isfinite(high - low), high - low, MAX_ABS_OBS)
        self.low = np.maximum(low - width, -MAX_ABS_OBS)
        self.high = np.minimum(high + width, MAX_ABS_OBS)

    def contains(self, obs: np.ndarray) -> bool:
        """Whether every observation of the batch lies within the bounds."""
        if obs.dtype == np.uint8 and self.low.min() <= 0 and self.high.max() >= 255:
            return True  # nothing a uint8 can hold is out of bounds; skip the pass over images
        return bool(np.all(obs >= self.low) and np.all(obs <= self.high))


def check_hello(msg: Message, fingerprint: str) -> None:
    """No tensors, an address, whether the sender mixes and trains, our network's fingerprint."""
    if msg.tensors or not isinstance(msg.meta.get("addr"), str):
        raise Rejected("bad_hello")
    if msg.meta.get("mix", 1) not in (0, 1) or msg.meta.get("go", 0) not in (0, 1):
        raise Rejected("bad_hello")
    if msg.meta.get("fp") != fingerprint:
        raise Rejected("fingerprint")


def check_params(msg: Message, n_params: int, max_weight: float | None) -> tuple[float, float]:
    """One float32 vector of our model's size and bounded (de-biased) values; its push-sum
    share and the running total of its link, each in (0, `max_weight`] and the total at least
    the share. `max_weight` None means pairwise mixing, where neither is sent: (1.0, 1.0).
    """
    flat = msg.tensors.get("params")
    if len(msg.tensors) != 1 or flat is None or flat.shape != (n_params,):
        raise Rejected("bad_params")
    round_ = msg.meta.get("round")
    if flat.dtype != np.float32 or not isinstance(round_, int) or round_ < 0:
        raise Rejected("bad_params")
    share, total = (msg.meta.get("w"), msg.meta.get("sum")) if max_weight else (1.0, 1.0)
    if not (isinstance(share, float) and isinstance(total, float)):
        raise Rejected("bad_params")
    if max_weight is not None and not isinstance(msg.meta.get("to"), int):
        raise Rejected("bad_params")
    if max_weight is not None and not (0.0 < share <= max_weight and share <= total < math.inf):
        raise Rejected("bad_params")
    low, high = msg.extrema["params"]  # found in decode's single pass over the values
    if max(-low, high) > MAX_ABS_PARAM:
        raise Rejected("out_of_bounds")
    return share, total


def experience_bytes(spec: EnvSpec, n: int) -> int:
    """The size on the wire of `n` shared transitions."""
    obs = int(np.prod(spec.obs_shape)) * np.dtype(spec.obs_dtype).itemsize
    return n * (2 * obs + 8 + 4 + 4)


def check_experience(msg: Message, spec: EnvSpec, bounds: ObsBounds, max_n: int) -> None:
    """Our field names, dtypes and shapes; at most `max_n` transitions; values within bounds."""
    t = msg.tensors
    if set(t) != EXPERIENCE_FIELDS:
        raise Rejected("bad_experience")
    n = len(t["actions"]) if t["actions"].ndim == 1 else -1
    if not 0 < n <= max_n or t["actions"].dtype != np.int64:
        raise Rejected("bad_experience")
    for name in ("obs", "next_obs"):
        if t[name].shape != (n, *spec.obs_shape) or t[name].dtype != spec.obs_dtype:
            raise Rejected("bad_experience")
    for name in ("rewards", "discounts"):
        if t[name].shape != (n,) or t[name].dtype != np.float32:
            raise Rejected("bad_experience")
    if t["actions"].min() < 0 or t["actions"].max() >= spec.n_actions:
        raise Rejected("out_of_bounds")
    rewards, discounts = msg.extrema["rewards"], msg.extrema["discounts"]
    if max(-rewards[0], rewards[1]) > MAX_ABS_REWARD or discounts[0] < 0.0 or discounts[1] > 1.0:
        raise Rejected("out_of_bounds")
    if not (bounds.contains(t["obs"]) and bounds.contains(t["next_obs"])):
        raise Rejected("out_of_bounds")
