"""ZeroMQ sockets: one ROUTER in, one DEALER per peer out, all owned by one background thread."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from gossipdqn.config import FaultsConfig, GossipConfig, SecurityConfig
from gossipdqn.net.faults import FaultInjector, Inbox, Outbox
from gossipdqn.net.keys import CurveKeys, curve_keys_for

log = logging.getLogger(__name__)

CURVE_DOMAIN = "gossipdqn"
"""ZAP domain of every gossipdqn ROUTER; the authenticator only answers for it."""

_START_TIMEOUT_S = 10.0
_MAX_WAIT_S = 0.5  # the I/O thread re-checks its queues at least this often
_RECV_BATCH = 256  # inbound messages taken per wake-up before serving the send side
_MAX_FRAMES = 256  # inbound messages with more frames are dropped ("malformed")
_BLOCKED = None  # _pump_peer: the DEALER would block; wait for POLLOUT


class TransportError(RuntimeError):
    """The transport cannot start or run; the message says what is wrong and what is expected."""


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


@dataclass(frozen=True)
class _Sockets:
    wake: zmq.Socket
    router: zmq.Socket
    dealers: dict[int, zmq.Socket]

    def close(self) -> None:
        for sock in (self.wake, self.router, *self.dealers.values()):
            sock.close(linger=0)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _set_common(sock: zmq.Socket, gossip: GossipConfig) -> None:
    sock.linger = 0
    sock.setsockopt(zmq.HEARTBEAT_IVL, _ms(gossip.heartbeat_s))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ms(gossip.peer_timeout_s))
    sock.setsockopt(zmq.HEARTBEAT_TTL, min(_ms(gossip.peer_timeout_s), 6_553_599))
    sock.setsockopt(zmq.HANDSHAKE_IVL, _ms(gossip.peer_timeout_s))


def _start_authenticator(context: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    auth = ThreadAuthenticator(context)
    try:
        auth.start()
        auth.configure_curve(domain=CURVE_DOMAIN, location=str(keys.authorized_dir))
    except Exception as e:
        auth.stop()
        raise TransportError(
            f"CURVE authenticator failed to start ({e}); expected one transport with keys per "
            "zmq.Context"
        ) from e
    return auth


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
    ) -> None:
        if rank in peer_addresses:
            raise ValueError(f"peer_addresses: node {rank} lists itself as a peer")
        self.rank, self.bind_address = rank, bind_address
        self.peer_addresses = dict(peer_addresses)
        self.bound_address = ""
        self.peer_ranks: dict[bytes, int] = {}
        self._gossip, self._security = gossip, security
        self._context, self._own_context = context, context is None
        self._identity_prefix = identity_prefix
        self._started_at = time.monotonic()
        self._outbox = Outbox(
            self.peer_addresses,
            gossip.queue_messages,
            gossip.max_bytes_per_s,
            FaultInjector(faults, rank, seed),
            self._started_at,
        )
        self._lock = threading.Lock()  # guards the inbox and the counters
        self._inbox = Inbox(inbound_limit or gossip.queue_messages * max(1, len(peer_addresses)))
        self._counts: Counter[str] = Counter()
        self._dropped_in: Counter[str] = Counter()
        self._arrived, self._ready, self._stop = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )
        self._wake_address = f"inproc://gossipdqn-wake-{uuid.uuid4().hex}"
        self._wake_lock = threading.Lock()
        self._waker: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._setup_error: BaseException | None = None
        self._curve: CurveKeys | None = None
        self._auth: ThreadAuthenticator | None = None

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
        self._context = self._context or zmq.Context()
        try:
            if self._curve is not None:
                self._auth = _start_authenticator(self._context, self._curve)
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

    def broadcast(self, frames: Sequence[Any]) -> int:
        """Queue `frames` for every peer; the number of peers it was queued for."""
        return sum(self.send(peer, frames) for peer in self.peer_addresses)

    def receive(self, max_messages: int = 64) -> list[Inbound]:
        """Up to `max_messages` received messages, senders in turn, without blocking."""
        with self._lock:
            out = self._inbox.take(max_messages)
            if not self._inbox:
                self._arrived.clear()
        return out

    def wait(self, timeout_s: float) -> bool:
        """Block until a message is waiting in `receive` or `timeout_s` passes."""
        return self._arrived.wait(timeout_s)

    def rank_of(self, message: Inbound) -> int | None:
        """The sender rank its CURVE key proves or, without CURVE, its routing id claims.

        A routing id is `<prefix><rank>:<nonce>`; the rank is all that counts.
        """
        if self._curve is not None:
            key = message.user_id.encode() if message.user_id else b""
            return self.peer_ranks.get(key)
        prefix = self._identity_prefix.encode()
        claim = message.peer_identity.removeprefix(prefix) if prefix else message.peer_identity
        rank = claim.split(b":", 1)[0]
        return int(rank) if rank.isdigit() else None

    def stats(self) -> TransportStats:
        """Counters so far."""
        with self._lock:
            return TransportStats(
                bytes_sent=self._counts["bytes_sent"],
                bytes_received=self._counts["bytes_received"],
                messages_sent=self._counts["messages_sent"],
                messages_received=self._counts["messages_received"],
                dropped={**self._outbox.dropped(), **self._dropped_in},
                errors=self._counts["errors"],
                queued=self._outbox.queued(),
            )

    def _wake(self) -> None:
        with self._wake_lock:
            if self._waker is None:
                return
            with contextlib.suppress(zmq.Again):  # Again: a wake-up is already pending
                self._waker.send(b"", zmq.NOBLOCK)

    def _open_sockets(self) -> _Sockets:
        ctx, gossip, opened = self._context, self._gossip, []
        assert ctx is not None
        try:
            wake = ctx.socket(zmq.PAIR)
            opened.append(wake)
            wake.linger, wake.rcvhwm = 0, 1
            wake.bind(self._wake_address)
            router = ctx.socket(zmq.ROUTER)
            opened.append(router)
            _set_common(router, gossip)
            router.rcvhwm = max(16, 4 * gossip.queue_messages)
            router.setsockopt(zmq.MAXMSGSIZE, int(gossip.max_message_mb * 1024 * 1024))
            if self._curve is not None:
                router.curve_server = True
                router.curve_publickey = self._curve.node.public
                router.curve_secretkey = self._curve.node.secret
                router.zap_domain = CURVE_DOMAIN.encode()
                router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            router.bind(self.bind_address)
            self.bound_address = router.last_endpoint.decode()
            dealers = {}
            for peer, address in self.peer_addresses.items():
                dealers[peer] = ctx.socket(zmq.DEALER)
                opened.append(dealers[peer])
                self._configure_dealer(dealers[peer], peer)
                dealers[peer].connect(address)
        except BaseException:
            for sock in opened:
                sock.close(linger=0)
            raise
        return _Sockets(wake, router, dealers)

    def _configure_dealer(self, dealer: zmq.Socket, peer: int) -> None:
        _set_common(dealer, self._gossip)
        # unique per connection: a second client claiming our rank cannot take over our pipe
        dealer.identity = f"{self._identity_prefix}{self.rank}:{uuid.uuid4().hex[:8]}".encode()
        dealer.sndhwm, dealer.rcvhwm = self._gossip.queue_messages, 1
        dealer.immediate = True
        dealer.reconnect_ivl = 100
        dealer.reconnect_ivl_max = max(100, _ms(self._gossip.heartbeat_s))
        if self._curve is not None:
            dealer.curve_serverkey = self._curve.server_keys[peer]
            dealer.curve_publickey = self._curve.node.public
            dealer.curve_secretkey = self._curve.node.secret

    def _run(self) -> None:
        try:
            sockets = self._open_sockets()
        except BaseException as e:  # reported by start() on the caller's thread
            self._setup_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(sockets)
        finally:
            sockets.close()

    def _loop(self, sockets: _Sockets) -> None:
        poller = zmq.Poller()
        poller.register(sockets.wake, zmq.POLLIN)
        poller.register(sockets.router, zmq.POLLIN)
        wait_s = 0.0
        while not self._stop.is_set():
            events = dict(poller.poll(math.ceil(min(wait_s, _MAX_WAIT_S) * 1000)))
            try:
                if sockets.wake in events:
                    while sockets.wake.poll(0):
                        sockets.wake.recv()
                if sockets.router in events:
                    self._pump_inbound(sockets.router)
                wait_s = self._pump_outbound(sockets, poller)
            except Exception:  # the thread must outlive any one bad event
                with self._lock:
                    self._counts["errors"] += 1
                log.exception("node %d: transport I/O error (counted, continuing)", self.rank)
                wait_s = _MAX_WAIT_S

    def _pump_outbound(self, sockets: _Sockets, poller: zmq.Poller) -> float:
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
            item, wait_s = self._outbox.take(peer, now)
            if item is None:
                return wait_s
            try:
                dealer.send_multipart(item.frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._outbox.put_back(peer, item)
                return _BLOCKED
            self._outbox.sent(peer, item)
            with self._lock:
                self._counts["messages_sent"] += 1
                self._counts["bytes_sent"] += item.nbytes

    def _pump_inbound(self, router: zmq.Socket) -> None:
        for _ in range(_RECV_BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._accept(frames)

    def _accept(self, frames: list[zmq.Frame]) -> None:
        if not 2 <= len(frames) <= _MAX_FRAMES:
            with self._lock:
                self._dropped_in["malformed"] += 1
            return
        user_id = None
        if self._curve is not None:
            try:
                user_id = frames[1].get("User-Id")
            except zmq.ZMQError:
                user_id = None
        inbound = Inbound(frames[0].bytes, user_id, frames[1:], time.monotonic())
        with self._lock:
            if not self._inbox.put(inbound.peer_identity, inbound):
                self._dropped_in["inbound_full"] += 1
            self._counts["messages_received"] += 1
            self._counts["bytes_received"] += sum(len(f) for f in inbound.frames)
            self._arrived.set()
