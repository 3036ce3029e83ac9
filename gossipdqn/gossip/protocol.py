"""The gossip protocol: hellos, parameter mixing and experience sharing between peers.

A synchronous front for the node loop: every call returns at once. Sockets live on the
transport's I/O thread; here we only decide what to send and what to do with what arrived.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from gossipdqn.config import GossipConfig
from gossipdqn.dqn.learner import Learner
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.gossip.checks import (
    EXPERIENCE_FIELDS,
    MAX_SHARED_TRANSITIONS,
    ObsBounds,
    Rejected,
    check_experience,
    check_hello,
    check_params,
    experience_bytes,
)
from gossipdqn.gossip.mixer import MIXING_WINDOW_S, Mixer
from gossipdqn.gossip.mixing import consensus_distance
from gossipdqn.gossip.peers import (
    DropLog,
    Peer,
    alive_ranks,
    awaited_ranks,
    check_order,
    mixing_ranks,
    replace_dead,
    start_incarnation,
)
from gossipdqn.gossip.snapshots import SnapshotPool
from gossipdqn.gossip.topology import out_peers
from gossipdqn.net.transport import Inbound, Transport, TransportStats
from gossipdqn.net.wire import Kind, Message, WireError, WireLimits, decode, encode, limits_for
from gossipdqn.types import EnvSpec, Transitions

log = logging.getLogger(__name__)


@dataclass
class Counts:
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


class Gossip:
    """Mixes the learner's online net with peers' and trades experience; implements Exchange."""

    def __init__(
        self, rank: int, addresses: list[str], transport: Transport, cfg: GossipConfig, *,
        run_id: str, spec: EnvSpec, fingerprint: str, bounds: ObsBounds, seed: int = 0,
    ) -> None:  # fmt: skip
        self.rank, self.world, self.cfg = rank, len(addresses), cfg
        self.transport, self.run_id, self.spec = transport, run_id, spec
        self.fingerprint, self.bounds = fingerprint, bounds
        self.peers = {r: Peer(a) for r, a in enumerate(addresses) if r != rank}
        self.incarnation = secrets.randbits(63)
        """A random id, new in every process: never the wall clock, which can step back."""
        self.generation = 0
        """How many times this node has resumed from its checkpoint (kept in the checkpoint)."""
        self.limits = limits_for(cfg)
        self.rng = np.random.default_rng(seed)
        self.drop_log = DropLog(rank)
        self.counts = Counts()
        self.seq = self.round = 0
        self.mixer = Mixer(cfg, self.world, rank)
        self.started = time.monotonic()
        self.training = False
        """Past the rendezvous: hellos say so, and a peer that starts later joins at once."""
        self.last_hello = -1e9
        self.next_share = cfg.share_every
        self.pending: list[Transitions] = []
        self.learner: Learner | None = None
        self.replay: ReplayBuffer | None = None
        self.max_transitions = MAX_SHARED_TRANSITIONS

    def attach(self, learner: Learner, replay: ReplayBuffer) -> None:
        self.learner, self.replay = learner, replay
        self.n_params = learner.online_flat.numel()
        bounds = inbound_bounds(self.cfg, self.spec, self.n_params, replay.capacity)
        self.max_transitions = bounds.transitions
        self.snapshots = SnapshotPool(learner.online_flat)
        self.limits = replace(
            self.limits, max_total_bytes=min(self.limits.max_total_bytes, bounds.tensor_bytes)
        )
        self.say_hello(force=True)

    # -- the node's hooks -------------------------------------------------------------------

    def rendezvous(self, stop: threading.Event) -> None:
        """Wait for the peers (`wait_for_peers`), then tell them this node trains."""
        wait_for_peers(self, stop)
        self.training = True
        self.say_hello(force=True)

    def after_env_step(self, env_steps: int, transitions: Transitions) -> None:
        """Take in what arrived; say hello on schedule; share experience every share_every."""
        self.say_hello()
        self.poll()
        if self.cfg.experience:
            self.pending.append(transitions)
            if env_steps >= self.next_share:
                self.next_share = env_steps + self.cfg.share_every
                self._share_experience()

    def after_update(self, updates: int) -> None:
        """Every `interval` updates, one round of parameter gossip."""
        if self.cfg.params and updates % self.cfg.interval == 0:
            self.round += 1
            self.poll()
            self._send_params()

    def poll(self) -> int:
        """Handle every message waiting in the transport; how many were accepted."""
        accepted = 0
        params: list[tuple[Peer, Message]] = []
        for inbound in self.transport.receive(256):
            try:
                peer, msg = self._validate(inbound)
            except (WireError, Rejected) as e:
                self._drop(inbound, e.reason)
                continue
            accepted += 1
            peer.accepted += 1
            self.counts.received[msg.kind.name.lower()] += 1
            peer.last_heard = time.monotonic()
            if msg.kind == Kind.PARAMS:
                params.append((peer, msg))
            elif msg.kind == Kind.EXPERIENCE:
                self._receive_experience(msg)
        if params:
            self._mix(params)
        return accepted

    # -- validation ---------------------------------------------------------------------------

    def _validate(self, inbound: Inbound) -> tuple[Peer, Message]:
        """Decode and check everything before use; the peer's replay counters move only here."""
        msg = decode(inbound.frames, self.limits, run_id=self.run_id, expected=None)
        claimed = self.transport.rank_of(inbound)
        if msg.sender != claimed or msg.sender not in self.peers:
            raise Rejected("sender_mismatch")
        peer = self.peers[msg.sender]
        new = check_order(peer, msg, time.monotonic(), self.cfg.peer_timeout_s)
        if msg.kind == Kind.HELLO:
            check_hello(msg, self.fingerprint)
        elif msg.kind == Kind.PARAMS:
            check_params(msg, self.n_params, self.world if self.mixer.push_sum else None)
        elif msg.kind == Kind.EXPERIENCE:
            check_experience(msg, self.spec, self.bounds, self.max_transitions)
        else:
            raise Rejected("unexpected_kind")
        if new:
            start_incarnation(peer, msg)
        if msg.kind == Kind.HELLO:
            peer.mixes = msg.meta.get("mix", 1) == 1
            peer.trains = msg.meta.get("go", 0) == 1
        peer.last_seq = msg.seq
        return peer, msg

    def _drop(self, inbound: Inbound, reason: str) -> None:
        """Count a drop by reason; log it at most once a minute per peer (strangers share one)."""
        self.counts.dropped[reason] += 1
        rank = self.transport.rank_of(inbound)
        peer = self.peers.get(rank) if rank is not None else None
        self.drop_log.dropped(rank, peer, reason, time.monotonic())

    # -- sending ------------------------------------------------------------------------------

    def _message(self, kind: Kind, tensors: dict[str, np.ndarray], **meta: Any) -> list:
        self.seq += 1
        step = self.learner.updates if self.learner else 0
        meta |= {"inc": self.incarnation, "gen": self.generation}
        return encode(Message(kind, self.run_id, self.rank, self.seq, step, tensors, meta))

    def _send(self, peer: int, kind: Kind, frames: list) -> bool:
        """Queue `frames` for `peer`; False when the transport refused them (a fault rule)."""
        queued = self.transport.send(peer, frames)
        if queued:
            self.counts.sent[kind.name.lower()] += 1
        return queued

    def say_hello(self, *, force: bool = False) -> None:
        """Send every peer a hello when one is due (every heartbeat_s), or now with `force`."""
        now = time.monotonic()
        if not force and now - self.last_hello < self.cfg.heartbeat_s:
            return
        self.last_hello = now
        addr = self.transport.bound_address or self.transport.bind_address
        meta = {"addr": addr, "fp": self.fingerprint, "mix": int(self.cfg.params)}
        meta["go"] = int(self.training)
        for rank in self.peers:
            self._send(rank, Kind.HELLO, self._message(Kind.HELLO, {}, **meta))

    def alive(self) -> list[int]:
        """Peers heard from within peer_timeout_s."""
        return alive_ranks(self.peers, self.cfg.peer_timeout_s, time.monotonic())

    def _round_targets(self) -> list[int]:
        """This round's out-peers; one that is dead or does not mix is replaced by the next
        rank after it that is alive and mixes."""
        wanted = out_peers(
            self.cfg.topology, self.rank, self.world, self.round, k=self.cfg.degree, seed=0
        ) if self.world > 1 else []  # fmt: skip
        return replace_dead(wanted, mixing_ranks(self.peers, self.alive()), self.world)

    def _send_params(self) -> None:
        """One round: θ to each out-peer whose queue is idle, with a push-sum share and the
        running total of weight sent on that link (see `PushSumLinks`).

        The message carries de-biased θ, not the mass v·θ: the snapshot is the only pass over
        the model on this side, and the receiver mixes in one. A peer still busy with earlier
        messages is skipped this round rather than queued for (flow control); weight in a
        message that is lost or refused on the way arrives with the next one on its link.
        """
        targets = [r for r in self._round_targets() if self.transport.queued(r) == 0]
        if not targets or self.learner is None:
            return
        snapshot = self.snapshots.capture(self.learner.online_flat)
        params = {"params": snapshot.host.numpy()}
        links = [(r, inc) for r in targets if (inc := self.peers[r].incarnation) is not None]
        for rank, meta in self.mixer.shares(links):
            frames = self._message(Kind.PARAMS, params, round=self.round, **meta)
            frames[1] = snapshot.frame  # the same bytes, tracked so the buffer is reused once sent
            self._send(rank, Kind.PARAMS, frames)

    def _share_experience(self) -> None:
        batch = shareable(self.pending, self.cfg.share_batch)
        self.pending = []
        alive = self.alive()
        if len(batch) == 0 or not alive:
            return
        chosen = self.rng.choice(alive, size=min(self.cfg.share_fanout, len(alive)), replace=False)
        frames = self._message(Kind.EXPERIENCE, batch._asdict())
        for rank in chosen:
            self._send(int(rank), Kind.EXPERIENCE, frames)

    # -- receiving ----------------------------------------------------------------------------

    def _receive_experience(self, msg: Message) -> None:
        assert self.replay is not None
        self.replay.add(Transitions(**msg.tensors))

    def _mix(self, arrivals: list[tuple[Peer, Message]]) -> None:
        """Mix received parameters into the online net in place (see `Mixer.mix`); the online
        parameters are views of one flat vector, so the whole model mixes at once."""
        assert self.learner is not None
        with torch.no_grad():
            for peer, msg in arrivals:
                self.mixer.mix(self.learner.online_flat, peer, msg, self.incarnation)
                peer.params_round = self.round
        self.learner.sync_actor_net()

    def mixing_stalled(self) -> bool:
        """Nothing mixed in for `MIXING_WINDOW_S` seconds while peers that mix are alive."""
        quiet_s = self.mixer.rate.quiet_s(time.monotonic(), self.started)
        alive = mixing_ranks(self.peers, self.alive())
        return self.cfg.params and bool(alive) and quiet_s >= MIXING_WINDOW_S

    def state_dict(self) -> dict[str, int]:
        """What a resumed node needs to go on: its round and how often it has resumed."""
        return {"round": self.round, "generation": self.generation}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Go on from a checkpoint: the saved round, and a generation above the saved one, so
        peers take this incarnation at once."""
        self.round, self.generation = int(state["round"]), int(state["generation"]) + 1

    # -- reporting ----------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Cumulative gossip counters, rates, drops by reason, peers alive, consensus distance."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out = traffic_metrics(self.transport.stats(), self.counts, elapsed)
        out |= {
            "gossip_round": self.round,
            "peers_alive": len(self.alive()),
            "push_sum_weight": self.mixer.links.weight,
            "params_mixed": self.mixer.rate.total,
            "params_mixed_per_s": self.mixer.rate.per_s(time.monotonic(), self.started),
            "mixing_stalled": self.mixing_stalled(),
        }
        if self.mixer.rejected:
            out["dropped_robust_reject"] = self.mixer.rejected
        if self.transport.insecure:
            out["insecure"] = True
        if self.learner is not None:  # every in-peer sends within about two periods of rounds
            since = self.round - 2 * math.ceil(math.log2(max(2, self.world))) - 2
            out |= consensus(self.learner.online_flat, self.peers, self.alive(), since)
        return out

    def close(self) -> None:
        self.transport.close()


def wait_for_peers(gossip: Gossip, stop: threading.Event) -> None:
    """Before the first step, wait up to `rendezvous_s` until every peer is heard or one says
    it trains already: a swarm starts together (as torchrun's ranks do), and a node that
    restarts joins a running swarm at once. A peer not heard by then is left to join later."""
    cfg, began = gossip.cfg, time.monotonic()
    deadline, told = began + cfg.rendezvous_s, False
    while (missing := awaited_ranks(gossip.peers, gossip.alive())) and not stop.is_set():
        now = time.monotonic()
        if now >= deadline:
            log.warning("node %d starts without peers %s: not heard within gossip.rendezvous_s "
                        "= %g s", gossip.rank, missing, cfg.rendezvous_s)  # fmt: skip
            return
        if not told and now - began >= cfg.heartbeat_s:
            told = True
            log.warning("node %d waits up to %g s for peers %s before training",
                        gossip.rank, cfg.rendezvous_s, missing)  # fmt: skip
        gossip.transport.wait(min(deadline - now, cfg.heartbeat_s))
        gossip.say_hello()
        gossip.poll()


def traffic_metrics(stats: TransportStats, counts: Counts, elapsed_s: float) -> dict[str, Any]:
    """Bytes and messages sent and received (totals and rates), counts by kind, drops by reason."""
    out: dict[str, Any] = {
        "gossip_sent_bytes": stats.bytes_sent,
        "gossip_recv_bytes": stats.bytes_received,
        "gossip_sent_bytes_per_s": stats.bytes_sent / elapsed_s,
        "gossip_recv_bytes_per_s": stats.bytes_received / elapsed_s,
        "gossip_sent_msgs_per_s": stats.messages_sent / elapsed_s,
        "gossip_recv_msgs_per_s": stats.messages_received / elapsed_s,
        "gossip_sent_msgs": stats.messages_sent,
        "gossip_recv_msgs": stats.messages_received,
    }
    for kind in ("hello", "params", "experience"):
        out[f"gossip_sent_{kind}"] = counts.sent[kind]
        out[f"gossip_recv_{kind}"] = counts.received[kind]
    for reason, n in (Counter(stats.dropped) + counts.dropped).items():
        out[f"dropped_{reason}"] = n
    return out


MESSAGE_PARTS = 1 + len(EXPERIENCE_FIELDS)
"""The most frames an honest message has: its header and the five experience fields."""


class InboundBounds(NamedTuple):
    """The most an honest peer of this run sends: transitions in a share, bytes in one frame
    (plus a margin; the transport's ZMQ_MAXMSGSIZE) and in one message's tensors."""

    transitions: int
    frame_bytes: int
    tensor_bytes: int


def inbound_bounds(cfg: GossipConfig, spec: EnvSpec, n_params: int, capacity: int) -> InboundBounds:
    """What this node accepts, from its own model size, env spec and `share_batch`."""
    n = min(MAX_SHARED_TRANSITIONS, capacity, cfg.share_batch)
    obs_frame = n * int(np.prod(spec.obs_shape)) * np.dtype(spec.obs_dtype).itemsize
    largest = max(4 * n_params, obs_frame, 8 * n, WireLimits().max_header_bytes)
    frame_bytes = min(largest + 4096, int(cfg.max_message_mb * 1024 * 1024))
    return InboundBounds(n, frame_bytes, max(4 * n_params, experience_bytes(spec, n)) + 1024)


def shareable(pending: list[Transitions], n: int) -> Transitions:
    """What to share: the `n` latest of the node's own transitions since its last share.

    Never what peers sent (it would echo round the swarm) and never one transition twice.
    """
    return Transitions(*(np.concatenate(a)[-n:] for a in zip(*pending)))


def consensus(
    flat: torch.Tensor, peers: dict[int, Peer], alive: list[int], since: int
) -> dict[str, float]:
    """Mean distance (and its ratio to ||θ||) to the parameters of alive peers received since
    round `since`: older ones would hold the figure at a value the swarm has left behind."""
    latest = [
        p.params for r, p in peers.items() if p.params is not None and r in alive
        and p.params_round >= since
    ]  # fmt: skip
    if not latest:
        return {}
    distance, ratio = consensus_distance(flat.detach().cpu(), latest)
    return {"consensus_distance": distance, "consensus_ratio": ratio}
