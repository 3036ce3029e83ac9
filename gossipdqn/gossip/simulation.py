"""Many nodes' parameter mixing in one process, through the node's own code, with faults.

Each simulated node holds what a gossip node holds for mixing (a `Mixer`, a `Peer` per peer,
an incarnation and a generation) and each round does what `Gossip` does: choose out-peers
(`topology.out_peers`, with dead or non-mixing ones replaced by `peers.replace_dead`), split its
weight (`Mixer.shares`), and take in what arrives (`peers.check_order`,
`peers.start_incarnation`, `Mixer.mix`). Messages are `wire.Message`s that a `FaultModel`
drops, duplicates, delays or cuts off by a partition. Time is counted in rounds. No sockets.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from gossipdqn.config import GossipConfig
from gossipdqn.gossip.checks import Rejected
from gossipdqn.gossip.mixer import Mixer
from gossipdqn.gossip.peers import Peer, check_order, replace_dead, start_incarnation
from gossipdqn.gossip.topology import out_peers
from gossipdqn.net.wire import Kind, Message


@dataclass(frozen=True)
class Restart:
    """Rank `rank` dies and comes back at `round`, from its checkpoint (`resume`) or fresh."""

    round: int
    rank: int
    resume: bool


@dataclass(frozen=True)
class FaultModel:
    """What happens to messages and nodes; every probability is per message."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    max_delay_rounds: int = 5
    restarts: tuple[Restart, ...] = ()
    partition: tuple[int, int, frozenset[int]] | None = None
    """(start, end, group): in rounds [start, end), `group` and the rest cannot talk."""
    sinks: frozenset[int] = frozenset()
    """Ranks that run with gossip.params = false: they never send or mix parameters."""


@dataclass
class SimNode:
    """One node's mixing state; `theta` is its flat parameter vector."""

    rank: int
    theta: torch.Tensor
    mixer: Mixer
    peers: dict[int, Peer]
    incarnation: int
    generation: int = 0
    seq: int = 0
    mixed_at: list[int] = field(default_factory=list)


class Swarm:
    """`world` simulated nodes starting from `initial` (world, dim) parameters."""

    def __init__(
        self, initial: torch.Tensor, cfg: GossipConfig, faults: FaultModel, *, seed: int = 0,
        timeout_rounds: int = 8, hello_every: int = 4,
    ) -> None:  # fmt: skip
        self.initial, self.cfg, self.faults = initial.float(), cfg, faults
        self.world, self.timeout, self.hello_every = len(initial), timeout_rounds, hello_every
        self.rng = np.random.default_rng(seed)
        self.nodes = [self._fresh(rank) for rank in range(self.world)]
        for node in self.nodes:  # as their first hellos would tell them
            for rank, peer in node.peers.items():
                peer.incarnation, peer.last_heard = self.nodes[rank].incarnation, 0.0
                peer.generation = 0
        self.in_flight: dict[int, list[tuple[int, Message]]] = defaultdict(list)
        self.round = 0

    def _fresh(self, rank: int, theta: torch.Tensor | None = None, generation: int = 0) -> SimNode:
        peers = {r: Peer(f"sim://{r}") for r in range(self.world) if r != rank}
        for r, peer in peers.items():
            peer.mixes = r not in self.faults.sinks
        theta = self.initial[rank].clone() if theta is None else theta
        inc = int(self.rng.integers(1, 2**62))
        return SimNode(rank, theta, Mixer(self.cfg, self.world, rank), peers, inc, generation)

    def cut(self, a: int, b: int) -> bool:
        """Whether a partition separates ranks `a` and `b` this round."""
        if self.faults.partition is None:
            return False
        start, end, group = self.faults.partition
        return start <= self.round < end and ((a in group) != (b in group))

    def step(self) -> None:
        """One round: restarts due, every mixing node sends, every due message arrives."""
        for restart in self.faults.restarts:
            if restart.round == self.round:
                old = self.nodes[restart.rank]
                theta = old.theta if restart.resume else None
                self.nodes[restart.rank] = self._fresh(
                    restart.rank, theta, old.generation + 1 if restart.resume else 0
                )
                self.nodes[restart.rank].mixed_at = old.mixed_at
        for node in self.nodes:
            if self.round % self.hello_every == 0:
                self._hello(node)
            if node.rank not in self.faults.sinks:
                self._send(node)
        for receiver, msg in self.in_flight.pop(self.round, []):
            self._receive(self.nodes[receiver], msg)
        self.round += 1

    def _hello(self, node: SimNode) -> None:
        """A hello to every peer, as a node sends each heartbeat: how peers learn incarnations."""
        for rank in node.peers:
            node.seq += 1
            meta = {"inc": node.incarnation, "gen": node.generation}
            self._post(rank, Message(Kind.HELLO, "sim", node.rank, node.seq, 0, {}, meta))

    def _send(self, node: SimNode) -> None:
        reachable = {
            r for r, p in node.peers.items()
            if p.mixes and p.incarnation is not None and not self.cut(node.rank, r)
        }  # fmt: skip
        wanted = out_peers(self.cfg.topology, node.rank, self.world, self.round, k=self.cfg.degree)
        targets = replace_dead(wanted, reachable, self.world)
        links = [(r, inc) for r in targets if (inc := node.peers[r].incarnation) is not None]
        for target, meta in node.mixer.shares(links):
            node.seq += 1
            meta = {"round": self.round, "inc": node.incarnation, "gen": node.generation} | meta
            params = {"params": node.theta.numpy().copy()}
            msg = Message(Kind.PARAMS, "sim", node.rank, node.seq, 0, params, meta)
            self._post(target, msg)

    def _post(self, target: int, msg: Message) -> None:
        f, draw = self.faults, self.rng.random()
        if draw < f.drop:
            return
        copies = 2 if draw < f.drop + f.duplicate else 1
        for _ in range(copies):
            late = draw >= 1 - f.delay
            lag = int(self.rng.integers(1, f.max_delay_rounds + 1)) if late else 0
            self.in_flight[self.round + lag].append((target, msg))

    def _receive(self, node: SimNode, msg: Message) -> None:
        peer = node.peers[msg.sender]
        if self.cut(node.rank, msg.sender):
            return
        try:
            new = check_order(peer, msg, float(self.round), float(self.timeout))
        except Rejected:
            return
        if new:
            start_incarnation(peer, msg)
        peer.last_seq, peer.last_heard = msg.seq, float(self.round)
        if msg.kind == Kind.HELLO:
            return
        before = node.mixer.rate.total
        with torch.no_grad():
            node.mixer.mix(node.theta, peer, msg, node.incarnation)
        if node.mixer.rate.total > before:
            node.mixed_at.append(self.round)

    def spread(self) -> float:
        """max_i ||theta_i - mean|| / ||mean||: how far the nodes are from one value."""
        thetas = torch.stack([n.theta for n in self.nodes if n.rank not in self.faults.sinks])
        mean = thetas.mean(dim=0)
        return float(torch.linalg.vector_norm(thetas - mean, dim=1).max() / mean.norm())

    def weights(self) -> list[float]:
        return [n.mixer.links.weight for n in self.nodes]

    def longest_gap(self, start: int = 0) -> int:
        """The most rounds any mixing node went without mixing a message in, from `start`."""
        gaps = []
        for node in self.nodes:
            if node.rank in self.faults.sinks:
                continue
            times = [start, *[t for t in node.mixed_at if t >= start], self.round]
            gaps.append(max(b - a for a, b in zip(times, times[1:])))
        return max(gaps)


def gossip_settings(**changes: object) -> GossipConfig:
    """The default gossip settings with `changes`."""
    return dataclasses.replace(GossipConfig(), **changes)
