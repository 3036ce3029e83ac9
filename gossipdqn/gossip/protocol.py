"""The gossip protocol: hellos, parameter mixing and experience sharing between peers.

A synchronous front for the node loop: every call returns at once. Sockets live on the
transport's I/O thread; here we only decide what to send and what to do with what arrived.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from gossipdqn.config import GossipConfig
from gossipdqn.dqn.learner import Learner
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.gossip.checks import (
    MAX_SHARED_TRANSITIONS,
    ObsBounds,
    Rejected,
    check_experience,
    check_hello,
    check_params,
    experience_bytes,
)
from gossipdqn.gossip.mixing import (
    AdaptiveClipThreshold,
    consensus_distance,
    pairwise_average,
    push_sum_mix_,
    push_sum_part,
    robust_filter,
)
from gossipdqn.gossip.snapshots import SnapshotPool
from gossipdqn.gossip.topology import out_peers
from gossipdqn.net.transport import Inbound, Transport
from gossipdqn.net.wire import Kind, Message, WireError, decode, encode, limits_for, readonly_tensor
from gossipdqn.types import EnvSpec, Transitions

log = logging.getLogger(__name__)

MIN_WEIGHT_SHARE = 0.25
"""A node keeps at least this fraction of the mean push-sum weight (1): a node faster than its
peers waits for their mass instead of giving its own away until its learning counts for nothing."""
LOG_EVERY_S = 60.0
"""Dropped messages are logged at most this often per peer (and once for all strangers)."""


@dataclass
class Peer:
    """What this node knows of one peer."""

    address: str
    last_heard: float | None = None
    incarnation: int = 0
    last_seq: int = -1
    last_round: int = -1
    params: torch.Tensor | None = None
    """The peer's latest de-biased parameters (a read-only view of its message)."""
    last_logged: float = -1e9
    accepted: int = 0


@dataclass
class Counts:
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


class Gossip:
    """Mixes the learner's online net with peers' and trades experience; implements Exchange."""

    def __init__(
        self,
        rank: int,
        addresses: list[str],
        transport: Transport,
        cfg: GossipConfig,
        *,
        run_id: str,
        spec: EnvSpec,
        fingerprint: str,
        bounds: ObsBounds,
        seed: int = 0,
    ) -> None:
        self.rank, self.world, self.cfg = rank, len(addresses), cfg
        self.transport, self.run_id, self.spec = transport, run_id, spec
        self.fingerprint, self.bounds = fingerprint, bounds
        self.peers = {r: Peer(a) for r, a in enumerate(addresses) if r != rank}
        self.incarnation = time.time_ns()
        self.limits = limits_for(cfg)
        self.rng = np.random.default_rng(seed)
        n_peers = max(1, self.world - 1)  # tau: 3x the lower median of each peer's distance
        self.clip = AdaptiveClipThreshold(window=n_peers, initial=0.0, min_count=min(2, n_peers))
        self.stranger_logged = -1e9
        self.counts = Counts()
        self.seq = 0
        self.round = 0
        self.weight = 1.0
        self.weight_waits = 0
        self.started = time.monotonic()
        self.last_hello = -1e9
        self.next_share = cfg.share_every
        self.pending: list[Transitions] = []
        self.learner: Learner | None = None
        self.replay: ReplayBuffer | None = None

    def attach(self, learner: Learner, replay: ReplayBuffer) -> None:
        self.learner, self.replay = learner, replay
        self.n_params = learner.online_flat.numel()
        self.snapshots = SnapshotPool(learner.online_flat)
        largest = max(4 * self.n_params, experience_bytes(self.spec, self._max_transitions()))
        self.limits = replace(
            self.limits, max_total_bytes=min(self.limits.max_total_bytes, largest + 1024)
        )
        self._hello(force=True)

    # -- the node's hooks -------------------------------------------------------------------

    def after_env_step(self, env_steps: int, transitions: Transitions) -> None:
        """Take in what arrived; say hello on schedule; share experience every share_every."""
        self._hello()
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
        incarnation = msg.meta.get("inc")
        if not isinstance(incarnation, int) or incarnation < peer.incarnation:
            raise Rejected("replayed")
        if incarnation == peer.incarnation and msg.seq <= peer.last_seq:
            raise Rejected("replayed")
        if msg.kind == Kind.HELLO:
            check_hello(msg, self.fingerprint)
        elif msg.kind == Kind.PARAMS:
            check_params(msg, self.n_params, self._weight_range())
            if msg.meta["round"] < peer.last_round - self.cfg.max_staleness:
                raise Rejected("stale")
            peer.last_round = max(peer.last_round, int(msg.meta["round"]))
        elif msg.kind == Kind.EXPERIENCE:
            check_experience(msg, self.spec, self.bounds, self._max_transitions())
        else:
            raise Rejected("unexpected_kind")
        peer.incarnation, peer.last_seq = incarnation, msg.seq
        return peer, msg

    def _weight_range(self) -> tuple[float, float] | None:
        """Push-sum weights an honest peer sends: at least its floor share, at most the total."""
        if self.cfg.mixing != "push_sum":
            return None
        return MIN_WEIGHT_SHARE / self.world * (1 - 1e-6), self.world * (1 + 1e-6)

    def _max_transitions(self) -> int:
        capacity = self.replay.capacity if self.replay is not None else MAX_SHARED_TRANSITIONS
        return min(MAX_SHARED_TRANSITIONS, capacity)

    def _drop(self, inbound: Inbound, reason: str) -> None:
        """Count a drop by reason; log it at most once a minute per peer (strangers share one)."""
        self.counts.dropped[reason] += 1
        rank = self.transport.rank_of(inbound)
        peer = self.peers.get(rank) if rank is not None else None
        now = time.monotonic()
        if now - (peer.last_logged if peer is not None else self.stranger_logged) < LOG_EVERY_S:
            return
        if peer is not None:
            peer.last_logged = now
        else:
            self.stranger_logged = now
        log.warning("node %d dropped a message from %r: %s", self.rank, rank, reason)

    # -- sending ------------------------------------------------------------------------------

    def _message(self, kind: Kind, tensors: dict[str, np.ndarray], **meta: Any) -> list:
        self.seq += 1
        step = self.learner.updates if self.learner else 0
        meta |= {"inc": self.incarnation}
        return encode(Message(kind, self.run_id, self.rank, self.seq, step, tensors, meta))

    def _send(self, peer: int, kind: Kind, frames: list) -> bool:
        """Queue `frames` for `peer`; False when the transport refused them (a fault rule)."""
        queued = self.transport.send(peer, frames)
        if queued:
            self.counts.sent[kind.name.lower()] += 1
        return queued

    def _hello(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_hello < self.cfg.heartbeat_s:
            return
        self.last_hello = now
        addr = self.peers_address_of_self()
        for rank in self.peers:
            self._send(
                rank, Kind.HELLO, self._message(Kind.HELLO, {}, addr=addr, fp=self.fingerprint)
            )

    def peers_address_of_self(self) -> str:
        return self.transport.bound_address or self.transport.bind_address

    def alive(self) -> list[int]:
        """Peers heard from within peer_timeout_s."""
        now = time.monotonic()
        return [
            r for r, p in self.peers.items()
            if p.last_heard is not None and now - p.last_heard <= self.cfg.peer_timeout_s
        ]  # fmt: skip

    def _round_targets(self) -> list[int]:
        """This round's out-peers; a dead one is replaced by the next alive rank after it."""
        alive = set(self.alive())
        if not alive:
            return []
        wanted = out_peers(
            self.cfg.topology, self.rank, self.world, self.round, k=self.cfg.degree, seed=0
        ) if self.world > 1 else []  # fmt: skip
        targets: list[int] = []
        for rank in wanted:
            while rank not in alive:
                rank = (rank + 1) % self.world
            if rank not in targets:
                targets.append(rank)
        return targets

    def _send_params(self) -> None:
        """One round: θ (with a push-sum weight share) to each out-peer whose queue is idle.

        The message carries de-biased θ and the share's weight v, not the mass v·θ: the snapshot
        is the only pass over the model on this side, and the receiver mixes in one. A peer still
        busy with earlier messages is skipped this round rather than queued for, so push-sum
        weight leaves only in messages that go out, never in ones dropped as stale.
        """
        targets = [r for r in self._round_targets() if self.transport.queued(r) == 0]
        if not targets or self.learner is None:
            return
        meta = {}
        if self.cfg.mixing == "push_sum":
            part = float(push_sum_part(self.weight, len(targets)))
            if part < MIN_WEIGHT_SHARE / self.world:
                self.weight_waits += 1
                return  # checked before the snapshot, so a waiting round copies nothing
            meta["w"] = part
        snapshot = self.snapshots.capture(self.learner.online_flat)
        params = {"params": snapshot.host.numpy()}
        frames = self._message(Kind.PARAMS, params, round=self.round, **meta)
        frames[1] = snapshot.frame  # the same bytes, tracked so the buffer is reused once sent
        sent = sum(self._send(rank, Kind.PARAMS, frames) for rank in targets)
        if self.cfg.mixing == "push_sum":  # a share that never left is still ours: no mass lost
            self.weight = meta["w"] * (len(targets) + 1 - sent)

    def _share_experience(self) -> None:
        assert self.replay is not None
        if self.replay.prioritized:
            batch = self.replay.highest_priority(self.cfg.share_batch)
        else:
            batch = Transitions(
                *(np.concatenate(a)[-self.cfg.share_batch :] for a in zip(*self.pending))
            )
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
        """Mix received parameters into the online net in place: one fused op per message.

        Push-sum: θ <- (w·θ + v·θ_peer) / (w + v), w <- w + v. Pairwise: θ <- (θ + θ_peer) / 2.
        The online parameters are views of one flat vector, so the whole model mixes at once.
        """
        assert self.learner is not None
        flat = self.learner.online_flat
        with torch.no_grad():
            for peer, msg in arrivals:
                peer.params = readonly_tensor(msg.tensors["params"])
                peer_theta = self._robust(flat, peer.params, peer.address)
                if peer_theta is None:
                    continue
                peer_theta = peer_theta.to(flat.device, non_blocking=True)
                if self.cfg.mixing == "push_sum":
                    self.weight = push_sum_mix_(flat, self.weight, peer_theta, msg.meta["w"])
                else:
                    pairwise_average(flat, peer_theta)
        self.learner.sync_actor_net()

    def _robust(
        self, flat: torch.Tensor, peer_theta: torch.Tensor, source: str
    ) -> torch.Tensor | None:
        """The peer's parameters after `gossip.robust` (clipped toward ours, or None)."""
        if self.cfg.robust == "none":
            return peer_theta
        kept = robust_filter(flat.cpu(), peer_theta, self.cfg.robust, self.clip, source)
        if kept is None:
            self.counts.dropped["robust_reject"] += 1
        return kept

    # -- reporting ----------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Cumulative gossip counters, rates, drops by reason, peers alive, consensus distance."""
        stats = self.transport.stats()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out: dict[str, Any] = {
            "gossip_sent_bytes": stats.bytes_sent,
            "gossip_recv_bytes": stats.bytes_received,
            "gossip_sent_bytes_per_s": stats.bytes_sent / elapsed,
            "gossip_recv_bytes_per_s": stats.bytes_received / elapsed,
            "gossip_sent_msgs_per_s": stats.messages_sent / elapsed,
            "gossip_recv_msgs_per_s": stats.messages_received / elapsed,
            "gossip_sent_msgs": stats.messages_sent,
            "gossip_recv_msgs": stats.messages_received,
            "gossip_round": self.round,
            "peers_alive": len(self.alive()),
            "push_sum_weight": self.weight,
            "push_sum_weight_waits": self.weight_waits,
        }
        for kind in ("hello", "params", "experience"):
            out[f"gossip_sent_{kind}"] = self.counts.sent[kind]
            out[f"gossip_recv_{kind}"] = self.counts.received[kind]
        for reason, n in (Counter(stats.dropped) + self.counts.dropped).items():
            out[f"dropped_{reason}"] = n
        out |= self._consensus()
        return out

    def _consensus(self) -> dict[str, float]:
        latest = [p.params for p in self.peers.values() if p.params is not None]
        if self.learner is None or not latest:
            return {}
        distance, ratio = consensus_distance(self.learner.online_flat.detach().cpu(), latest)
        return {"consensus_distance": distance, "consensus_ratio": ratio}

    def close(self) -> None:
        self.transport.close()
