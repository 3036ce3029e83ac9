"""CURVE key pairs per node: generate, load, map public keys to ranks, decide if keys are needed."""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from gossipdqn.config import SecurityConfig

log = logging.getLogger(__name__)

AUTHORIZED = "authorized"
"""Subdirectory holding the public keys every node accepts (and dials as servers)."""

_NAME = re.compile(r"^node-(\d+)\.key$")

INSECURE_WARNING = (
    "INSECURE: security.insecure is set and there are no CURVE keys; gossip on the network is "
    "unauthenticated and unencrypted"
)
"""Logged at start and shown in every progress line of a node that runs so."""


class SecurityError(ValueError):
    """Keys are missing, malformed or exposed, or the settings refuse to run without them."""


@dataclass(frozen=True)
class NodeKeys:
    """One node's CURVE key pair, z85-encoded."""

    public: bytes
    secret: bytes


@dataclass(frozen=True)
class CurveKeys:
    """Everything a transport needs for CURVE: its pair, its peers' server keys, the ACL dir."""

    node: NodeKeys
    server_keys: dict[int, bytes]
    authorized_dir: Path
    ranks: dict[bytes, int]


def public_key_path(directory: str | Path, rank: int) -> Path:
    """Where node `rank`'s public key lives inside `authorized/`."""
    return Path(directory) / AUTHORIZED / f"node-{rank}.key"


def generate_keys(directory: str | Path, nodes: int) -> list[Path]:
    """Write `node-<r>.key_secret` (0600), `node-<r>.key` and `authorized/node-<r>.key`."""
    if nodes < 1:
        raise ValueError(f"nodes: expected at least 1, got {nodes}")
    root = Path(directory)
    (root / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    written = []
    for rank in range(nodes):
        public, secret = zmq.auth.create_certificates(root, f"node-{rank}")
        Path(secret).chmod(0o600)
        shutil.copyfile(public, public_key_path(root, rank))
        written += [Path(public), Path(secret)]
    return written


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(
            f"{path}: key file not found; run `gossipdqn keys generate DIR --nodes N`"
        )
    if secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"{path}: secret key is readable by others; expected mode 0600 (chmod 600 {path})"
        )
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise SecurityError(f"{path}: not a ZeroMQ certificate ({e})") from None
    return public, secret_key


def load_node_keys(directory: str | Path, rank: int) -> NodeKeys:
    """Node `rank`'s key pair from `node-<rank>.key_secret`."""
    path = Path(directory) / f"node-{rank}.key_secret"
    public, secret = _load(path, secret=True)
    if secret is None:
        raise SecurityError(f"{path}: no secret key inside; expected a .key_secret file")
    return NodeKeys(public=public, secret=secret)


def authorized_public_keys(directory: str | Path) -> dict[bytes, int]:
    """z85 public key -> rank for every `authorized/node-<r>.key`."""
    folder = Path(directory) / AUTHORIZED
    if not folder.is_dir():
        raise SecurityError(
            f"{folder}: directory of authorized public keys not found; "
            "run `gossipdqn keys generate DIR --nodes N`"
        )
    ranks: dict[bytes, int] = {}
    for path in sorted(folder.glob("*.key")):
        match = _NAME.match(path.name)
        if match is None:
            raise SecurityError(f"{path}: unexpected key file name; expected node-<rank>.key")
        public, _ = _load(path, secret=False)
        ranks[public] = int(match.group(1))
    return ranks


def load_curve_keys(directory: str | Path, rank: int, peers: Iterable[int]) -> CurveKeys:
    """Node `rank`'s pair, each peer's public (server) key and the authorized key map."""
    peers = tuple(peers)
    ranks = authorized_public_keys(directory)
    by_rank = {r: key for key, r in ranks.items()}
    missing = sorted(set(peers) - set(by_rank))
    if missing:
        raise SecurityError(
            f"{public_key_path(directory, missing[0])}: public key of peer {missing[0]} not found"
        )
    return CurveKeys(
        node=load_node_keys(directory, rank),
        server_keys={p: by_rank[p] for p in peers},
        authorized_dir=Path(directory) / AUTHORIZED,
        ranks=ranks,
    )


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ endpoint is only reachable from this machine."""
    scheme, _, rest = address.partition("://")
    if scheme in ("inproc", "ipc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def curve_keys_for(
    security: SecurityConfig, rank: int, bind_address: str, peers: Iterable[int]
) -> CurveKeys | None:
    """The node's CURVE keys, or None to run without; refuses what the settings forbid."""
    if security.keys_dir:
        if not zmq.has("curve"):
            raise SecurityError(
                "security.keys_dir is set but this libzmq has no CURVE support; expected "
                "pyzmq wheels built with libsodium, or security.keys_dir unset"
            )
        return load_curve_keys(security.keys_dir, rank, peers)
    if is_loopback(bind_address):
        return None
    if not security.insecure:
        raise SecurityError(
            f"node {rank}: refusing to bind {bind_address} without CURVE keys; run "
            "`gossipdqn keys generate DIR --nodes N` and set security.keys_dir=DIR (`gossipdqn "
            "launch` does this for you), or set security.insecure=true to accept an "
            "unauthenticated, unencrypted run"
        )
    log.warning(INSECURE_WARNING + " (node %d binds %s)", rank, bind_address)
    return None
