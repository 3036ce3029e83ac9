"""Parameter-server liveness on real loopback transports: a busy loop is not a dead process.

A server's or worker's loop can stop handling messages for longer than `gossip.peer_timeout_s`
(a slow gradient step under load, a worker waiting for parameters) while its process lives; the
other side must keep it. A closed transport (a process that died) must still be noticed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from gossipdqn.baselines.ps import Link, ParameterServer, ServerExchange
from gossipdqn.cluster.local import free_ports
from gossipdqn.config import Config, load_config
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.learner import Learner
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.net.transport import Transport
from gossipdqn.net.wire import Kind
from gossipdqn.types import Transitions

pytestmark = pytest.mark.timeout(60)

PEER_TIMEOUT_S = 1.0
BUSY_S = 3 * PEER_TIMEOUT_S
"""How long a loop stays busy: three times the silence after which a peer counts as dead."""
LIMIT_S = 10.0
NO_TRANSITIONS = Transitions(*(np.zeros((0, 4), np.float32) for _ in range(5)))


class BlockingServer(ParameterServer):
    """A server whose gradient step blocks, as a busy learner does, until the test releases it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()

    def _apply(self, grads: torch.Tensor) -> None:
        self.entered.set()
        self.release.wait(LIMIT_S)
        super()._apply(grads)


@dataclass
class Pair:
    """A server (rank 0) serving on its own thread and one worker (rank 1), both on loopback."""

    cfg: Config
    server: ParameterServer
    serving: threading.Thread
    server_stop: threading.Event
    worker: ServerExchange
    worker_stop: threading.Event


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """The server class is `request.param` (ParameterServer unless parametrized)."""
    cfg = load_config(None, [
        "network.hidden=[16,16]", f"gossip.peer_timeout_s={PEER_TIMEOUT_S}",
        "gossip.heartbeat_s=0.2",
    ])  # fmt: skip
    urls = [f"tcp://127.0.0.1:{port}" for port in free_ports(2)]
    links = [
        Link(rank, "liveness", Transport(rank, urls[rank], {1 - rank: urls[1 - rank]},
             cfg.gossip, cfg.security, cfg.faults), cfg.gossip)
        for rank in (0, 1)
    ]  # fmt: skip
    server_stop, worker_stop = threading.Event(), threading.Event()
    serving: threading.Thread | None = None
    server: ParameterServer | None = None
    try:
        for link in links:
            link.transport.start()
        server = getattr(request, "param", ParameterServer)(cfg, links[0], pull_every=1000)
        serving = threading.Thread(target=server.serve, args=(server_stop,), daemon=True)
        serving.start()
        env = make_vector_env(cfg.env, num_envs=1)
        spec = spec_of(env)
        env.close()
        worker = ServerExchange(links[1], worker_stop)
        learner = Learner(spec, cfg.network, cfg.learner, seed=1)
        worker.attach(learner, ReplayBuffer(64, spec.obs_shape, spec.obs_dtype))
        yield Pair(cfg, server, serving, server_stop, worker, worker_stop)
    finally:
        if isinstance(server, BlockingServer):
            server.release.set()
        server_stop.set()
        if serving is not None:
            serving.join(LIMIT_S)
        for link in links:
            link.transport.close()
    assert serving is None or not serving.is_alive(), "the server did not stop"


def step_worker_for(pair: Pair, seconds: float) -> None:
    """Run the worker's exchange as its node loop would (each env step) for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and pair.worker.lost is None:
        pair.worker.link.transport.wait(pair.cfg.gossip.heartbeat_s)
        pair.worker.after_env_step(0, NO_TRANSITIONS)


@pytest.mark.parametrize("pair", [BlockingServer], indirect=True)
def test_a_worker_keeps_a_server_whose_loop_is_busy(pair: Pair) -> None:
    server = pair.server
    assert isinstance(server, BlockingServer)
    grads = np.zeros(server.size, np.float32)
    assert pair.worker.link.send(0, Kind.GRADIENTS, {"grads": grads}, 0)
    assert server.entered.wait(LIMIT_S), "the server never started the gradient step"
    step_worker_for(pair, BUSY_S)  # the server's loop is blocked all this time
    assert pair.worker.lost is None, pair.worker.lost
    assert not pair.worker_stop.is_set()
    server.release.set()
    assert pair.serving.is_alive()


def test_the_server_keeps_a_worker_whose_loop_is_busy(pair: Pair) -> None:
    pair.serving.join(BUSY_S)  # the worker's loop sends and handles nothing all this time
    assert pair.serving.is_alive(), "the server gave up on a live worker"
    step_worker_for(pair, 2 * pair.cfg.gossip.heartbeat_s)
    assert pair.worker.lost is None


def test_the_server_stops_when_its_worker_dies(pair: Pair) -> None:
    started = time.monotonic()
    pair.worker.link.transport.close()
    pair.serving.join(LIMIT_S)
    assert not pair.serving.is_alive(), "the server kept serving a dead worker"
    assert time.monotonic() - started >= PEER_TIMEOUT_S


def test_a_worker_stops_when_its_server_dies(pair: Pair) -> None:
    pair.server_stop.set()
    pair.serving.join(LIMIT_S)
    started = time.monotonic()
    pair.server.link.transport.close()
    step_worker_for(pair, LIMIT_S)
    assert pair.worker.lost is not None and "silent" in pair.worker.lost
    assert pair.worker_stop.is_set()
    assert PEER_TIMEOUT_S <= time.monotonic() - started < LIMIT_S
