"""The transport's background loop: sockets to queues and back, counters, peers' connections."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from gossipdqn.net.liveness import Liveness
from gossipdqn.net.queues import Inbox, Outbox
from gossipdqn.net.sockets import Sockets

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.5  # the I/O thread re-checks its queues at least this often
_RECV_BATCH = 256  # inbound messages taken per wake-up before serving the send side
MAX_PARTS = 65
"""Default bound on the parts of an inbound message (the codec's header plus 64 tensors)."""
_BLOCKED = None  # _pump_peer: the DEALER would block; wait for POLLOUT


@dataclass(frozen=True)
class Inbound:
    """One received message: the sender's routing id, CURVE key (z85) and raw frames."""

    peer_identity: bytes
    user_id: str | None
    frames: list[zmq.Frame]
    received_at: float


@dataclass(frozen=True)
class TransportStats:
    """A snapshot of the transport's counters."""

    bytes_sent: int
    bytes_received: int
    messages_sent: int
    messages_received: int
    dropped: dict[str, int]
    errors: int
    queued: int


class IOLoop:
    """Everything the I/O thread does; `take`, `arrived` and `stats` are safe from any thread."""

    def __init__(
        self,
        rank: int,
        outbox: Outbox,
        inbox: Inbox,
        liveness: Liveness,
        rank_of: Callable[[Inbound], int | None],
        max_parts: int = MAX_PARTS,
    ) -> None:
        self.rank, self.outbox, self.liveness = rank, outbox, liveness
        self.max_parts = max_parts
        """Messages of more parts are discarded part by part as read ("malformed")."""
        self.arrived = threading.Event()  # set while the inbox holds a message
        self._inbox, self._rank_of, self._curve = inbox, rank_of, False
        self._lock = threading.Lock()  # guards the inbox and the counters
        self._counts: Counter[str] = Counter()
        self._dropped_in: Counter[str] = Counter()

    def take(self, max_messages: int) -> list[Inbound]:
        """Up to `max_messages` received messages, senders in turn."""
        with self._lock:
            out = self._inbox.take(max_messages)
            if not self._inbox:
                self.arrived.clear()
        return out

    def stats(self) -> TransportStats:
        """Counters so far."""
        with self._lock:
            return TransportStats(
                bytes_sent=self._counts["bytes_sent"],
                bytes_received=self._counts["bytes_received"],
                messages_sent=self._counts["messages_sent"],
                messages_received=self._counts["messages_received"],
                dropped={**self.outbox.dropped(), **self._dropped_in},
                errors=self._counts["errors"],
                queued=self.outbox.queued(),
            )

    def run(self, sockets: Sockets, stop: threading.Event) -> None:
        """Poll until `stop`: take what arrives, send what may leave, follow each connection."""
        self._curve = sockets.curve
        poller = zmq.Poller()
        for sock in (sockets.wake, sockets.router, *sockets.monitors):
            poller.register(sock, zmq.POLLIN)
        wait_s = 0.0
        while not stop.is_set():
            events = dict(poller.poll(math.ceil(min(wait_s, MAX_WAIT_S) * 1000)))
            try:
                if sockets.wake in events:
                    while sockets.wake.poll(0):
                        sockets.wake.recv()
                for monitor, peer in sockets.monitors.items():
                    if monitor in events:
                        self._follow(monitor, peer)
                if sockets.router in events:
                    self._pump_inbound(sockets.router)
                wait_s = self._pump_outbound(sockets, poller)
            except Exception:  # the thread must outlive any one bad event
                with self._lock:
                    self._counts["errors"] += 1
                log.exception("node %d: transport I/O error (counted, continuing)", self.rank)
                wait_s = MAX_WAIT_S

    def _follow(self, monitor: zmq.Socket, peer: int) -> None:
        """Apply a DEALER's monitor events to the peer's liveness."""
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.liveness.connected(peer, time.monotonic())
            elif event == zmq.EVENT_DISCONNECTED:
                self.liveness.disconnected(peer, time.monotonic())

    def _pump_outbound(self, sockets: Sockets, poller: zmq.Poller) -> float:
        """Send what each peer's budget and socket allow; seconds until the next due send."""
        now, wait_s = time.monotonic(), math.inf
        for peer, dealer in sockets.dealers.items():
            peer_wait = self._pump_peer(peer, dealer, now)
            poller.register(dealer, zmq.POLLOUT if peer_wait is _BLOCKED else 0)
            if peer_wait is not _BLOCKED:
                wait_s = min(wait_s, peer_wait)
        return wait_s

    def _pump_peer(self, peer: int, dealer: zmq.Socket, now: float) -> float | None:
        """Send what may leave: seconds until the next may, inf (idle) or _BLOCKED."""
        while True:
            item, wait_s = self.outbox.take(peer, now)
            if item is None:
                return wait_s
            try:
                dealer.send_multipart(item.frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.outbox.put_back(peer, item)
                return _BLOCKED
            self.outbox.sent(peer, item)
            with self._lock:
                self._counts["messages_sent"] += 1
                self._counts["bytes_sent"] += item.nbytes

    def _pump_inbound(self, router: zmq.Socket) -> None:
        for _ in range(_RECV_BATCH):
            try:
                frames = recv_bounded(router, 1 + self.max_parts)
            except zmq.Again:
                return
            self._accept(frames)

    def _accept(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:  # no parts after the routing id, or too many (see recv_bounded)
            with self._lock:
                self._dropped_in["malformed"] += 1
            return
        user_id = None
        if self._curve:
            try:
                user_id = frames[1].get("User-Id")
            except zmq.ZMQError:
                user_id = None
        inbound = Inbound(frames[0].bytes, user_id, frames[1:], time.monotonic())
        sender = self._rank_of(inbound)
        if sender is not None:
            self.liveness.heard(sender, inbound.received_at)
        with self._lock:
            if not self._inbox.put(inbound.peer_identity, inbound):
                self._dropped_in["inbound_full"] += 1
            self._counts["messages_received"] += 1
            self._counts["bytes_received"] += sum(len(f) for f in inbound.frames)
            self.arrived.set()


def recv_bounded(sock: zmq.Socket, limit: int) -> list[zmq.Frame]:
    """One whole message read part by part; [] (every part let go as read) past `limit` parts."""
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    frames, count = [frame], 1
    while frame.more:
        frame = sock.recv(copy=False)  # the rest of a message is already here: never waits
        count += 1
        if count <= limit:
            frames.append(frame)
        else:
            frames.clear()
    return frames
