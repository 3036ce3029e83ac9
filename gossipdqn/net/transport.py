"""ZeroMQ sockets: one ROUTER in, one DEALER per peer out, all owned by one background thread.

This module is the synchronous front; `sockets` opens the sockets, `ioloop` is the thread's
loop, `queues` holds what waits in between and `liveness` which peers answer.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from gossipdqn.config import FaultsConfig, GossipConfig, SecurityConfig
from gossipdqn.net.faults import FaultInjector
from gossipdqn.net.ioloop import MAX_PARTS, Inbound, IOLoop, TransportStats
from gossipdqn.net.keys import CurveKeys, curve_keys_for, is_loopback
from gossipdqn.net.liveness import Liveness
from gossipdqn.net.queues import Inbox, Outbox
from gossipdqn.net.sockets import (
    CURVE_DOMAIN,
    Authenticator,
    SocketPlan,
    TransportError,
    claimed_rank,
    open_sockets,
    start_authenticator,
)

__all__ = ["CURVE_DOMAIN", "Inbound", "Transport", "TransportError", "TransportStats"]

_START_TIMEOUT_S = 10.0


class Transport:
    """Non-blocking send/receive for one node; a background thread does all socket work."""

    def __init__(
        self,
        rank: int,
        bind_address: str,
        peer_addresses: Mapping[int, str],
        gossip: GossipConfig,
        security: SecurityConfig,
        faults: FaultsConfig,
        *,
        context: zmq.Context | None = None,
        identity_prefix: str = "",
        seed: int = 0,
        inbound_limit: int = 0,
        max_frame_bytes: int = 0,
        max_parts: int = MAX_PARTS,
    ) -> None:
        """`max_frame_bytes` (default `gossip.max_message_mb`) bounds each inbound frame and
        `max_parts` the frames of one inbound message; see docs/security.md for the totals."""
        if rank in peer_addresses:
            raise ValueError(f"peer_addresses: node {rank} lists itself as a peer")
        self.rank, self.bind_address = rank, bind_address
        self.peer_addresses = dict(peer_addresses)
        self.bound_address = ""
        self.insecure = False
        """Bound off loopback without CURVE (only under security.insecure); shown in progress."""
        self.peer_ranks: dict[bytes, int] = {}
        self._gossip, self._security = gossip, security
        self._context, self._own_context = context, context is None
        self._identity_prefix = identity_prefix
        self.max_frame_bytes = max_frame_bytes or int(gossip.max_message_mb * 1024 * 1024)
        self._started_at = time.monotonic()
        self._outbox = Outbox(
            self.peer_addresses,
            gossip.queue_messages,
            gossip.max_bytes_per_s,
            FaultInjector(faults, rank, seed),
            self._started_at,
        )
        self._inbox = Inbox(inbound_limit or gossip.queue_messages * max(1, len(peer_addresses)))
        self._liveness = Liveness(self.peer_addresses)
        self._loop = IOLoop(
            rank, self._outbox, self._inbox, self._liveness, self.rank_of, max_parts
        )
        self._ready, self._stop = threading.Event(), threading.Event()
        self._wake_address = f"inproc://gossipdqn-wake-{uuid.uuid4().hex}"
        self._wake_lock = threading.Lock()
        self._waker: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._setup_error: BaseException | None = None
        self._curve: CurveKeys | None = None
        self._auth: Authenticator | None = None

    def __enter__(self) -> Transport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Load keys, open and bind every socket on the I/O thread; raise if that fails."""
        if self._thread is not None or self._stop.is_set():
            raise TransportError("a transport starts once; make a new one")
        self._curve = curve_keys_for(
            self._security, self.rank, self.bind_address, self.peer_addresses
        )
        self.peer_ranks = dict(self._curve.ranks) if self._curve else {}
        self.insecure = self._curve is None and not is_loopback(self.bind_address)
        self._context = self._context or zmq.Context()
        try:
            if self._curve is not None:
                self._auth = start_authenticator(self._context, self._curve)
            self._started_at = time.monotonic()
            self._thread = threading.Thread(
                target=self._run, name=f"gossipdqn-transport-{self.rank}", daemon=True
            )
            self._thread.start()
            if not self._ready.wait(_START_TIMEOUT_S):
                raise TransportError(f"I/O thread did not start within {_START_TIMEOUT_S} s")
            if self._setup_error is not None:
                raise TransportError(
                    f"node {self.rank} cannot open its sockets (bind {self.bind_address}, "
                    f"peers {self.peer_addresses}): {self._setup_error}"
                ) from self._setup_error
            waker = self._context.socket(zmq.PAIR)
            waker.linger, waker.sndhwm = 0, 1
            waker.connect(self._wake_address)
            self._waker = waker
        except BaseException:
            self.close()
            raise

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the I/O thread, drop whatever is queued, release sockets; safe to call twice."""
        self._stop.set()
        self._wake()
        stuck = False
        if self._thread is not None:
            self._thread.join(timeout_s)
            stuck = self._thread.is_alive()
        with self._wake_lock:
            if self._waker is not None:
                self._waker.close(linger=0)
                self._waker = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if stuck:
            raise TransportError(f"node {self.rank}: I/O thread did not stop within {timeout_s} s")
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None

    def send(self, peer: int, frames: Sequence[Any]) -> bool:
        """Queue `frames` for `peer` without blocking; False when a fault rule dropped them."""
        if peer not in self.peer_addresses:
            raise ValueError(
                f"peer {peer}: not one of this node's peers {sorted(self.peer_addresses)}"
            )
        if self._stop.is_set():
            raise TransportError(f"node {self.rank}: transport is closed")
        now = time.monotonic()
        nbytes = sum(memoryview(f).nbytes for f in frames)
        queued = self._outbox.put(peer, list(frames), nbytes, now, now - self._started_at)
        if queued:
            self._wake()
        return queued

    def queued(self, peer: int) -> int:
        """Messages waiting to leave for `peer` (the protocol coalesces while this is not 0)."""
        return self._outbox.queued(peer)

    def receive(self, max_messages: int = 64) -> list[Inbound]:
        """Up to `max_messages` received messages, senders in turn, without blocking."""
        return self._loop.take(max_messages)

    def wait(self, timeout_s: float) -> bool:
        """Block until a message is waiting in `receive` or `timeout_s` passes."""
        return self._loop.arrived.wait(timeout_s)

    def silent_s(self, peer: int) -> float:
        """Seconds since `peer` was last known alive: 0.0 while its connection is up, inf if never.

        Judged on the I/O thread (ZeroMQ heartbeats and arrivals, see `net.liveness`), so neither
        this node's busy loop nor the peer's makes a live peer look dead.
        """
        if peer not in self.peer_addresses:
            raise ValueError(
                f"peer {peer}: not one of this node's peers {sorted(self.peer_addresses)}"
            )
        return self._liveness.silent_s(peer, time.monotonic())

    def rank_of(self, message: Inbound) -> int | None:
        """The sender rank its CURVE key proves or, without CURVE, its routing id claims."""
        ranks = self.peer_ranks if self._curve is not None else None
        return claimed_rank(message.peer_identity, message.user_id, ranks, self._identity_prefix)

    def stats(self) -> TransportStats:
        """Counters so far; `dropped["zap_denied"]`: handshakes the authenticator refused."""
        stats = self._loop.stats()
        if self._auth is not None and self._auth.denied:
            stats.dropped["zap_denied"] = self._auth.denied
        return stats

    def _wake(self) -> None:
        with self._wake_lock:
            if self._waker is None:
                return
            with contextlib.suppress(zmq.Again):  # Again: a wake-up is already pending
                self._waker.send(b"", zmq.NOBLOCK)

    def _run(self) -> None:
        assert self._context is not None
        plan = SocketPlan(
            self.rank, self.bind_address, self.peer_addresses, self._gossip, self._curve,
            self._identity_prefix, self._wake_address, self.max_frame_bytes,
        )  # fmt: skip
        try:
            sockets = open_sockets(self._context, plan)
        except BaseException as e:  # reported by start() on the caller's thread
            self._setup_error = e
            self._ready.set()
            return
        self.bound_address = sockets.router.last_endpoint.decode()
        self._ready.set()
        try:
            self._loop.run(sockets, self._stop)
        finally:
            sockets.close()
