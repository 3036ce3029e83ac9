"""In-process gossip nodes and a hand-driven fake peer for the security and fault tests."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import zmq

from gossipdqn.cluster.local import free_ports
from gossipdqn.config import load_config
from gossipdqn.dqn.networks import fingerprint
from gossipdqn.gossip.mixing import flatten
from gossipdqn.gossip.nodes import gossip_node
from gossipdqn.net.keys import NodeKeys
from gossipdqn.net.wire import Kind, Message, encode
from gossipdqn.node.node import Node, default_run_id

FAST = [
    "env.num_envs=4", "network.hidden=[16,16]", "learner.learning_starts=64",
    "learner.batch_size=16", "eval.every_steps=0", "checkpoint.every_steps=0",
    "gossip.heartbeat_s=0.2", "gossip.interval=4", "gossip.share_every=64",
    "gossip.share_batch=16", "train.total_steps=100000000",
]  # fmt: skip
"""Small CartPole nodes that gossip often: every part runs within a few hundred steps."""


def addresses(n: int) -> list[str]:
    return [f"127.0.0.1:{p}" for p in free_ports(n)]


def build(tmp_path: Path, peers: list[str], ranks: Sequence[int], overrides: list[str]) -> list:
    """Gossip nodes for `ranks` of the run whose peer list is `peers`; closed if one fails."""
    cfg = load_config(None, FAST + overrides)
    nodes: list[Node] = []
    try:
        for rank in ranks:
            nodes.append(gossip_node(
                cfg, tmp_path / f"node-{rank}", rank=rank, addresses=peers, quiet=True
            ))  # fmt: skip
    except BaseException:
        close_all(nodes)
        raise
    return nodes


def close_all(nodes: Sequence[Node]) -> None:
    for node in nodes:
        node.close()


def step_until(nodes: Sequence[Node], condition: Callable[[], bool], timeout_s: float) -> bool:
    """Step every node in turn until `condition` holds or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in nodes:
            node.train_step()
        if condition():
            return True
    return False


def params_of(node: Node) -> torch.Tensor:
    return flatten(list(node.learner.online.parameters())).detach().cpu().clone()


@dataclasses.dataclass
class FakePeer:
    """Rank `rank` of a run, driven by hand: DEALERs to nodes, messages made to order."""

    rank: int
    run_id: str
    context: zmq.Context
    keys: NodeKeys | None = None
    incarnation: int = 1
    generation: int = 0
    seq: int = 0
    sockets: dict[str, zmq.Socket] = dataclasses.field(default_factory=dict)

    def connect(self, address: str, server_key: bytes | None = None) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.linger, sock.sndhwm, sock.identity = 0, 100_000, str(self.rank).encode()
        sock.sndtimeo = 2_000  # a refused client may find no pipe to queue on
        if self.keys is not None and server_key is not None:
            sock.curve_serverkey = server_key
            sock.curve_publickey, sock.curve_secretkey = self.keys.public, self.keys.secret
        sock.connect(f"tcp://{address}")
        self.sockets[address] = sock
        return sock

    def message(
        self, kind: Kind, tensors: dict[str, np.ndarray] | None = None, **meta: object
    ) -> list:
        """Frames of a well-formed message with the next sequence number."""
        self.seq += 1
        meta = {"inc": self.incarnation, "gen": self.generation, **meta}
        return encode(Message(kind, self.run_id, self.rank, self.seq, 0, tensors or {}, meta))

    def hello(self, node: Node) -> list:
        return self.message(Kind.HELLO, addr="tcp://fake", fp=fingerprint(node.learner.online))

    def send(self, address: str, frames: list, flags: int = 0) -> None:
        self.sockets[address].send_multipart(frames, flags=flags, copy=False)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)


def run_id_of(peers: list[str]) -> str:
    """The run id every node of this peer list derives (as `gossip_node` does by default)."""
    return default_run_id(load_config(None, FAST).name, peers)


def rss_mib() -> float:
    """This process's resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
