"""Parameter server in the manner of Gorila: one server applies gradients sent by N workers.

Ranks: 0 is the server, 1..N the workers; every process binds its own address of the list and
talks over the same wire codec and transport as gossip. A worker sends the gradients of every
update (GRADIENTS, one flat float32 tensor) and never steps its own optimizer; the server
applies each one as it arrives (asynchronously, as Gorila does) and sends that worker fresh
parameters (PARAMS) after every `pull_every`-th of its updates, as the worker counts them (the
step of its gradients; a lost message shifts nothing), or when asked (PULL).

Liveness is the transport's (`Transport.silent_s`: ZeroMQ heartbeats on the I/O threads), not
messages from the other side's busy loop: a server deep in gradient work, or a worker waiting
for parameters, is alive. A worker whose server is silent for `gossip.peer_timeout_s` stops
with a clear error (the centralized weakness the comparison shows); a server whose workers have
all gone silent for that long stops serving.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossipdqn.baselines import ExchangeLost
from gossipdqn.config import Config, GossipConfig
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.learner import Learner
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.gossip.mixing import flatten, unflatten_into
from gossipdqn.net.transport import Inbound, Transport
from gossipdqn.net.wire import Kind, Message, WireError, decode, encode, limits_for
from gossipdqn.types import Transitions

SERVER_RANK = 0
STARTUP_TIMEOUT_S = 60.0
"""How long a worker waits for the server's first parameters (the server may start later)."""


def ps_transport(cfg: Config, rank: int, addresses: list[str], bind_host: str | None) -> Transport:
    """The transport of `rank`: the server talks to every worker, a worker to the server only."""
    endpoints = {r: f"tcp://{a}" for r, a in enumerate(addresses)}
    peers = {r: e for r, e in endpoints.items() if r != rank}
    if rank != SERVER_RANK:
        peers = {SERVER_RANK: endpoints[SERVER_RANK]}
    host, port = addresses[rank].rsplit(":", 1)
    transport = Transport(
        rank, f"tcp://{bind_host or host}:{port}", peers, cfg.gossip, cfg.security, cfg.faults,
        seed=cfg.seed,
    )  # fmt: skip
    transport.start()
    return transport


@dataclass
class Link:
    """Encodes this process's messages (with a sequence number) and decodes what arrives."""

    rank: int
    run_id: str
    transport: Transport
    cfg: GossipConfig
    seq: int = 0

    def send(self, peer: int, kind: Kind, tensors: dict[str, np.ndarray], step: int) -> bool:
        self.seq += 1
        msg = Message(kind, self.run_id, self.rank, self.seq, step, tensors)
        return self.transport.send(peer, encode(msg))

    def receive(self, dropped: Counter[str]) -> list[Message]:
        """Valid messages waiting now; the others are counted in `dropped` by reason."""
        out = []
        for inbound in self.transport.receive(256):
            try:
                out.append(self._validate(inbound))
            except WireError as e:
                dropped[e.reason] += 1
        return out

    def _validate(self, inbound: Inbound) -> Message:
        msg = decode(inbound.frames, limits_for(self.cfg), run_id=self.run_id)
        if msg.sender != self.transport.rank_of(inbound):
            raise WireError("sender_mismatch")
        if msg.sender not in self.transport.peer_addresses:
            raise WireError("sender_mismatch")
        return msg


def flat_tensor(msg: Message, name: str, size: int) -> torch.Tensor | None:
    """The message's one flat float32 tensor `name` of `size` elements (a copy), else None."""
    arr = msg.tensors.get(name)
    if len(msg.tensors) != 1 or arr is None or arr.dtype != np.float32 or arr.shape != (size,):
        return None
    return torch.tensor(arr)


class ParameterServer:
    """Holds the online net and Adam; applies every worker's gradients as they arrive."""

    def __init__(self, cfg: Config, link: Link, *, pull_every: int) -> None:
        env = make_vector_env(cfg.env, num_envs=1)
        spec = spec_of(env)
        env.close()
        self.cfg, self.link, self.pull_every = cfg, link, pull_every
        self.learner = Learner(spec, cfg.network, cfg.learner, seed=cfg.seed)
        self.params = list(self.learner.online.parameters())
        self.size = sum(p.numel() for p in self.params)
        self.applied: Counter[int] = Counter()
        self.params_sent: Counter[int] = Counter()
        self.dropped: Counter[str] = Counter()
        self.started = time.monotonic()

    def serve(self, stop: threading.Event) -> None:
        """Until `stop`, or every worker ever heard from has been silent for peer_timeout_s."""
        while not stop.is_set() and not self._workers_gone():
            self.link.transport.wait(self.cfg.gossip.heartbeat_s)
            for msg in self.link.receive(self.dropped):
                self._handle(msg)

    def _workers_gone(self) -> bool:
        transport = self.link.transport
        silences = [transport.silent_s(w) for w in transport.peer_addresses]
        heard = [s for s in silences if s < math.inf]
        return bool(heard) and all(s > self.cfg.gossip.peer_timeout_s for s in heard)

    def _handle(self, msg: Message) -> None:
        if msg.kind == Kind.PULL:
            self._send_params(msg.sender)
        elif msg.kind == Kind.GRADIENTS:
            grads = flat_tensor(msg, "grads", self.size)
            if grads is None:
                self.dropped["bad_gradients"] += 1
                return
            self._apply(grads)
            self.applied[msg.sender] += 1
            if (msg.step + 1) % self.pull_every == 0:  # the worker waits for these parameters
                self._send_params(msg.sender)
        elif msg.kind != Kind.HELLO:
            self.dropped["unexpected_kind"] += 1

    def _apply(self, grads: torch.Tensor) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        unflatten_into(grads.to(self.learner.device), [p.grad for p in self.params])
        self.learner.apply_gradients()
        self.learner.updates += 1

    def _send_params(self, worker: int) -> None:
        theta = flatten(self.params).cpu().numpy()
        if self.link.send(worker, Kind.PARAMS, {"params": theta}, self.learner.updates):
            self.params_sent[worker] += 1

    def summary(self) -> dict[str, Any]:
        """Gradients applied per worker, parameters sent, bytes in and out."""
        stats = self.link.transport.stats()
        wall = max(time.monotonic() - self.started, 1e-9)
        return {
            "role": "server", "wall_s": wall, "updates": self.learner.updates,
            "applied_by_worker": {str(w): n for w, n in sorted(self.applied.items())},
            "params_sent_by_worker": {str(w): n for w, n in sorted(self.params_sent.items())},
            "bytes_in": stats.bytes_received, "bytes_out": stats.bytes_sent,
            "bytes_in_per_s": stats.bytes_received / wall,
            "bytes_out_per_s": stats.bytes_sent / wall,
            "messages_in": stats.messages_received, "messages_out": stats.messages_sent,
            "dropped": dict(Counter(stats.dropped) + self.dropped),
        }  # fmt: skip


def run_server(
    cfg: Config, run_dir: Path, link: Link, stop: threading.Event, pull_every: int
) -> None:
    """Serve until done, then write `run_dir/summary.json` and the server's checkpoint."""
    server = ParameterServer(cfg, link, pull_every=pull_every)
    try:
        server.serve(stop)
    finally:
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = server.summary()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save(server.learner.online.state_dict(), run_dir / "server.pt")


class ServerExchange:
    """A worker's side (implements node.Exchange): gradients out, the server's parameters in."""

    def __init__(self, link: Link, stop: threading.Event, *, pull_every: int = 1) -> None:
        self.link, self.stop, self.cfg = link, stop, link.cfg
        self.pull_every = pull_every
        self.lost: str | None = None
        self.dropped: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()
        self.learner: Learner | None = None

    def attach(self, learner: Learner, replay: ReplayBuffer) -> None:
        """Take over the optimizer step; start from the server's parameters."""
        self.learner = learner
        self.params = list(learner.online.parameters())
        self.size = sum(p.numel() for p in self.params)
        learner.gradient_handler = self._send_gradients
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.counts["params_loaded"]:
            if time.monotonic() > deadline:
                raise ExchangeLost(
                    f"no parameters from the server at {self._server()} within "
                    f"{STARTUP_TIMEOUT_S:g} s; expected it started with the same peer list"
                )
            self._send(Kind.PULL, {})
            self.link.transport.wait(self.cfg.heartbeat_s)
            self._poll()
        with torch.no_grad():
            learner.target.load_state_dict(learner.online.state_dict())

    def _server(self) -> str:
        return self.link.transport.peer_addresses[SERVER_RANK]

    def _send(self, kind: Kind, tensors: dict[str, np.ndarray]) -> None:
        step = self.learner.updates if self.learner else 0
        if self.link.send(SERVER_RANK, kind, tensors, step):
            self.counts[f"sent_{kind.name.lower()}"] += 1

    def _send_gradients(self, learner: Learner) -> None:
        """The gradient handler: the flat gradients go to the server; no local step.

        Every `pull_every` updates the server answers with its parameters, and the worker
        waits for them (at most `gossip.peer_timeout_s`, asking again each heartbeat): gradients
        are never computed on parameters more than `pull_every` updates old, and no worker
        floods the server.
        """
        grads = flatten([p.grad for p in self.params]).cpu().numpy()
        self._send(Kind.GRADIENTS, {"grads": grads})
        if (learner.updates + 1) % self.pull_every == 0:
            self._await_params()

    def _await_params(self) -> None:
        loaded = self.counts["params_loaded"]
        deadline = time.monotonic() + self.cfg.peer_timeout_s
        while self.counts["params_loaded"] == loaded and not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return  # the silence check in after_env_step reports a dead server
            if not self.link.transport.wait(min(remaining, self.cfg.heartbeat_s)):
                self._send(Kind.PULL, {})  # the gradients or the answer may have been dropped
            self._poll()

    def _poll(self) -> None:
        """Take what arrived; load the newest parameters among it."""
        newest = None
        for msg in self.link.receive(self.dropped):
            params = flat_tensor(msg, "params", self.size) if msg.kind == Kind.PARAMS else None
            if params is not None:
                newest = params
            elif msg.kind == Kind.PARAMS:
                self.dropped["bad_params"] += 1
        if newest is not None and self.learner is not None:
            unflatten_into(newest.to(self.learner.device), self.params)
            self.learner.sync_actor_net()
            self.counts["params_loaded"] += 1

    def rendezvous(self, stop: threading.Event) -> None:
        """Nothing more to wait for: attach waited for the server's parameters."""

    def after_env_step(self, env_steps: int, transitions: Transitions) -> None:
        """Take in parameters; give up when the transport finds the server silent."""
        self._poll()
        silent = self.link.transport.silent_s(SERVER_RANK)
        if silent > self.cfg.peer_timeout_s and self.lost is None:
            self.lost = (
                f"parameter server at {self._server()} silent for {silent:.1f} s "
                f"(gossip.peer_timeout_s = {self.cfg.peer_timeout_s:g}); stopping this worker"
            )
            self.stop.set()

    def after_update(self, updates: int) -> None:
        self._poll()

    def metrics(self) -> dict[str, Any]:
        """Bytes and messages to and from the server, parameters loaded, drops."""
        stats = self.link.transport.stats()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out: dict[str, Any] = {
            "sent_bytes": stats.bytes_sent, "recv_bytes": stats.bytes_received,
            "sent_bytes_per_s": stats.bytes_sent / elapsed,
            "recv_bytes_per_s": stats.bytes_received / elapsed,
            "server_silent_s": min(self.link.transport.silent_s(SERVER_RANK), elapsed),
            "server_lost": self.lost or "",
        }  # fmt: skip
        out |= dict(self.counts)
        for reason, n in (Counter(stats.dropped) + self.dropped).items():
            out[f"dropped_{reason}"] = n
        return out

    def state_dict(self) -> dict[str, Any]:
        """Nothing: a resumed worker starts again from the server's parameters."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""

    def close(self) -> None:
        self.link.transport.close()
