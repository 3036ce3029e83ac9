"""What a hello or an experience share must hold before a node takes it: checked on decoded
messages, no socket."""

import numpy as np
import pytest

from gossipdqn.gossip.checks import ObsBounds, Rejected, check_experience, check_hello
from gossipdqn.net.wire import Kind, Message
from gossipdqn.types import EnvSpec

FP = "our-network"


def hello(tensors=None, **meta):
    meta = {"addr": "tcp://a:1", "fp": FP} | meta
    return Message(Kind.HELLO, "run", 1, 1, 0, tensors or {}, meta)


@pytest.mark.parametrize("meta", [{}, {"mix": 0, "go": 1}, {"mix": 1, "go": 0}])
def test_a_well_formed_hello_is_taken(meta):
    check_hello(hello(**meta), FP)


@pytest.mark.parametrize("message, reason", [
    (hello(mix=5), "bad_hello"),
    (hello(go=2), "bad_hello"),
    (hello(go="yes"), "bad_hello"),
    (hello(addr=7), "bad_hello"),
    (hello({"x": np.zeros(2, np.float32)}), "bad_hello"),
    (hello(fp="another network"), "fingerprint"),
], ids=["mix", "go", "go-str", "addr", "tensors", "fingerprint"])  # fmt: skip
def test_a_malformed_hello_is_refused_with_its_reason(message, reason):
    with pytest.raises(Rejected) as refused:
        check_hello(message, FP)
    assert refused.value.reason == reason


def experience(y: float, n: int = 4):
    """`n` LunarLander-shaped transitions, the first with height `y`."""
    obs = np.zeros((n, 8), np.float32)
    obs[0, 1] = y
    tensors = {"obs": obs, "actions": np.zeros(n, np.int64), "rewards": np.zeros(n, np.float32),
               "next_obs": obs.copy(), "discounts": np.full(n, 0.99, np.float32)}  # fmt: skip
    extrema = {"rewards": (0.0, 0.0), "discounts": (0.99, 0.99)}
    return Message(Kind.EXPERIENCE, "run", 1, 1, 0, tensors, {}, extrema)


LANDER = EnvSpec((8,), np.dtype(np.float32), 4)
LANDER_BOUNDS = ObsBounds(np.full(8, -2.5), np.full(8, 2.5))
"""Gymnasium's declared box for LunarLander-v3's position (the other sides alike here)."""


@pytest.mark.parametrize("y", [1.4, 5.3, -7.4])
def test_an_observation_an_env_really_makes_beyond_its_declared_box_is_taken(y):
    # a lander firing its main engine climbs to y = 5.3 within 118 steps, past the declared 2.5
    # (gymnasium #752, #377: the height is unbounded); one box width beyond is still honest
    check_experience(experience(y), LANDER, LANDER_BOUNDS, 256)


@pytest.mark.parametrize("y", [7.6, -1e4, 1e30])
def test_an_observation_far_outside_the_box_is_refused(y):
    with pytest.raises(Rejected) as refused:
        check_experience(experience(y), LANDER, LANDER_BOUNDS, 256)
    assert refused.value.reason == "out_of_bounds"
