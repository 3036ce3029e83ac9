"""The transport's sockets: options, CURVE, the authenticator, and a monitor on each DEALER."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

from gossipdqn.config import GossipConfig
from gossipdqn.net.keys import CurveKeys

CURVE_DOMAIN = "gossipdqn"
"""ZAP domain of every gossipdqn ROUTER; the authenticator only answers for it."""

MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
"""What a DEALER's monitor reports: its connection to the peer came up, or went down."""


class TransportError(RuntimeError):
    """The transport cannot start or run; the message says what is wrong and what is expected."""


@dataclass(frozen=True)
class SocketPlan:
    """What one node's transport opens: its ROUTER's address, one DEALER per peer."""

    rank: int
    bind_address: str
    peer_addresses: Mapping[int, str]
    gossip: GossipConfig
    curve: CurveKeys | None
    identity_prefix: str
    wake_address: str
    max_frame_bytes: int
    """ZMQ_MAXMSGSIZE: libzmq drops a connection at a larger frame's length, before buffering it."""


@dataclass(frozen=True)
class Sockets:
    """The open sockets, all owned by the I/O thread; `monitors` maps a monitor to its peer."""

    wake: zmq.Socket
    router: zmq.Socket
    dealers: dict[int, zmq.Socket]
    monitors: dict[zmq.Socket, int]
    curve: bool

    def close(self) -> None:
        for dealer in self.dealers.values():
            dealer.disable_monitor()
        for sock in (*self.monitors, self.wake, self.router, *self.dealers.values()):
            sock.close(linger=0)


def ms(seconds: float) -> int:
    """Whole milliseconds, at least 1, as ZeroMQ options take them."""
    return max(1, int(seconds * 1000))


def _set_common(sock: zmq.Socket, gossip: GossipConfig) -> None:
    sock.linger = 0
    sock.setsockopt(zmq.HEARTBEAT_IVL, ms(gossip.heartbeat_s))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ms(gossip.peer_timeout_s))
    sock.setsockopt(zmq.HEARTBEAT_TTL, min(ms(gossip.peer_timeout_s), 6_553_599))
    sock.setsockopt(zmq.HANDSHAKE_IVL, ms(gossip.peer_timeout_s))


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, counting the handshakes it refuses in `denied`."""

    denied = 0

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous"
    ) -> None:
        if status_code != b"200":
            self.denied += 1
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> Authenticator:
    """The ZAP handler that admits only the keys in `keys.authorized_dir`."""
    auth = Authenticator(context)
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


def open_sockets(ctx: zmq.Context, plan: SocketPlan) -> Sockets:
    """Bind the wake-up PAIR and the ROUTER, connect a monitored DEALER to every peer."""
    opened: list[zmq.Socket] = []

    def new(kind: int) -> zmq.Socket:
        opened.append(ctx.socket(kind))
        return opened[-1]

    try:
        wake = new(zmq.PAIR)
        wake.linger, wake.rcvhwm = 0, 1
        wake.bind(plan.wake_address)
        router = new(zmq.ROUTER)
        _configure_router(router, plan)
        dealers, monitors = {}, {}
        for peer, address in plan.peer_addresses.items():
            dealers[peer] = new(zmq.DEALER)
            _configure_dealer(dealers[peer], peer, plan)
            monitor = dealers[peer].get_monitor_socket(
                MONITOR_EVENTS, f"inproc://gossipdqn-monitor-{uuid.uuid4().hex}"
            )
            opened.append(monitor)
            monitors[monitor] = peer
            dealers[peer].connect(address)
    except BaseException:
        for sock in opened:
            sock.close(linger=0)
        raise
    return Sockets(wake, router, dealers, monitors, curve=plan.curve is not None)


def _configure_router(router: zmq.Socket, plan: SocketPlan) -> None:
    _set_common(router, plan.gossip)
    router.rcvhwm = max(16, 4 * plan.gossip.queue_messages)
    router.setsockopt(zmq.MAXMSGSIZE, plan.max_frame_bytes)
    # a DEALER keeps its routing id when it reconnects, and the new connection can come up
    # before the old one has timed out here; libzmq would leave it unheard for good
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if plan.curve is not None:
        router.curve_server = True
        router.curve_publickey = plan.curve.node.public
        router.curve_secretkey = plan.curve.node.secret
        router.zap_domain = CURVE_DOMAIN.encode()
        router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    router.bind(plan.bind_address)


def _configure_dealer(dealer: zmq.Socket, peer: int, plan: SocketPlan) -> None:
    gossip = plan.gossip
    _set_common(dealer, gossip)
    # unique per socket: another client claiming our rank does not take over our pipe
    dealer.identity = f"{plan.identity_prefix}{plan.rank}:{uuid.uuid4().hex[:8]}".encode()
    dealer.sndhwm, dealer.rcvhwm = gossip.queue_messages, 1
    dealer.immediate = True
    dealer.reconnect_ivl = 100
    dealer.reconnect_ivl_max = max(100, ms(gossip.heartbeat_s))
    if plan.curve is not None:
        dealer.curve_serverkey = plan.curve.server_keys[peer]
        dealer.curve_publickey = plan.curve.node.public
        dealer.curve_secretkey = plan.curve.node.secret


def claimed_rank(
    identity: bytes, user_id: str | None, curve_ranks: Mapping[bytes, int] | None, prefix: str
) -> int | None:
    """The sender rank its CURVE key proves or, without CURVE, its routing id claims.

    A routing id is `<prefix><rank>:<nonce>` (see `_configure_dealer`); the rank is all that counts.
    """
    if curve_ranks is not None:
        return curve_ranks.get(user_id.encode() if user_id else b"")
    claim = identity.removeprefix(prefix.encode()) if prefix else identity
    rank = claim.split(b":", 1)[0]
    return int(rank) if rank.isdigit() else None
