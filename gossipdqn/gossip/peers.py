"""What a node knows of its peers: liveness, message order, round targets, drop logging; no I/O."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gossipdqn.gossip.checks import Rejected
from gossipdqn.net.wire import Message

log = logging.getLogger(__name__)

LINKS_KEPT = 4
"""Incarnations per peer whose push-sum link totals are remembered."""
LOG_EVERY_S = 60.0
"""Dropped messages are logged at most this often per peer (and once for all strangers)."""


@dataclass
class Peer:
    """What this node knows of one peer."""

    address: str
    last_heard: float | None = None
    """When a message of the peer's current incarnation was last accepted (monotonic s)."""
    incarnation: int | None = None
    generation: int = -1
    last_seq: int = -1
    link_seen: dict[int, float] = field(default_factory=dict)
    """Sender incarnation -> the running push-sum total last taken on its link to us (the
    newest few, so a forged incarnation in between cannot make an old link look new)."""
    mixes: bool = True
    """Whether the peer mixes parameters (its hellos say so); weight goes only to those that do."""
    trains: bool = False
    """Whether the peer's hellos say it has begun training (it is past its rendezvous)."""
    params: torch.Tensor | None = None
    """The peer's latest de-biased parameters (a read-only view of its message)."""
    params_round: int = -1
    """Our gossip round when `params` arrived."""
    last_logged: float = -1e9
    accepted: int = 0


def alive_ranks(peers: Mapping[int, Peer], timeout_s: float, now: float) -> list[int]:
    """Ranks of the peers heard from within `timeout_s` of `now`."""
    return [
        r for r, p in peers.items() if p.last_heard is not None and now - p.last_heard <= timeout_s
    ]


def awaited_ranks(peers: Mapping[int, Peer], alive: Sequence[int]) -> list[int]:
    """The peers a starting node still waits for: none once one alive trains, else those not
    heard (the rendezvous)."""
    if any(peers[r].trains for r in alive):
        return []
    return [r for r in peers if r not in alive]


def mixing_ranks(peers: Mapping[int, Peer], alive: Sequence[int]) -> set[int]:
    """The alive peers that mix parameters: the only ones push-sum weight may go to."""
    return {r for r in alive if peers[r].mixes}


def replace_dead(wanted: Sequence[int], alive: set[int], world: int) -> list[int]:
    """`wanted` ranks with each dead one replaced by the next alive rank after it, no repeats."""
    if not alive:
        return []
    targets: list[int] = []
    for rank in wanted:
        while rank not in alive:
            rank = (rank + 1) % world
        if rank not in targets:
            targets.append(rank)
    return targets


def check_order(peer: Peer, msg: Message, now: float, timeout_s: float) -> bool:
    """Whether `msg` opens a new incarnation of `peer`; refuses one it must not take.

    Within an incarnation, sequence numbers only grow. Another incarnation is taken when its
    generation (a counter its checkpoint keeps) is higher, or when the current one has been
    silent for `timeout_s`: so a forged or stale hello silences the real peer for at most that.
    """
    incarnation, generation = msg.meta.get("inc"), msg.meta.get("gen")
    if not isinstance(incarnation, int) or not isinstance(generation, int):
        raise Rejected("bad_header")
    if incarnation == peer.incarnation:
        if msg.seq <= peer.last_seq:
            raise Rejected("replayed")
        return False
    silent = peer.last_heard is None or now - peer.last_heard > timeout_s
    if generation <= peer.generation and not silent:
        raise Rejected("replayed")
    return True


def start_incarnation(peer: Peer, msg: Message) -> None:
    """Forget what belonged to the peer's previous incarnation: order, link, liveness."""
    peer.incarnation, peer.generation = msg.meta["inc"], msg.meta["gen"]
    peer.last_seq, peer.last_heard, peer.params = -1, None, None
    peer.link_seen[msg.meta["inc"]] = peer.link_seen.pop(msg.meta["inc"], 0.0)  # now newest
    while len(peer.link_seen) > LINKS_KEPT:
        del peer.link_seen[next(iter(peer.link_seen))]


class DropLog:
    """Logs a dropped message at most once a minute per peer; strangers share one slot."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.stranger_logged = -1e9

    def dropped(self, sender: int | None, peer: Peer | None, reason: str, now: float) -> None:
        if now - (peer.last_logged if peer is not None else self.stranger_logged) < LOG_EVERY_S:
            return
        if peer is not None:
            peer.last_logged = now
        else:
            self.stranger_logged = now
        log.warning("node %d dropped a message from %r: %s", self.rank, sender, reason)
