"""`gossip_node`: node `rank` of a gossip run, its transport bound and its peers known."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gossipdqn.config import Config
from gossipdqn.dqn.networks import fingerprint as network_fingerprint
from gossipdqn.gossip.checks import ObsBounds
from gossipdqn.gossip.protocol import MESSAGE_PARTS, Gossip, inbound_bounds
from gossipdqn.net.transport import Transport
from gossipdqn.node.node import Node, default_run_id, node_of_rank


def gossip_node(
    cfg: Config,
    run_dir: Path,
    *,
    rank: int,
    addresses: list[str],
    bind_host: str | None = None,
    run_id: str | None = None,
    resumed: bool = False,
    quiet: bool = False,
) -> Node:
    """Node `rank` of the run whose nodes listen at `addresses` (host:port, in rank order),
    gossiping with the others."""
    node = node_of_rank(cfg, run_dir, rank, len(addresses), resumed=resumed, quiet=quiet)
    endpoints = [f"tcp://{a}" for a in addresses]
    host, port = addresses[rank].rsplit(":", 1)
    peers = {r: e for r, e in enumerate(endpoints) if r != rank}
    bounds = inbound_bounds(
        cfg.gossip, node.spec, node.learner.online_flat.numel(), node.replay.capacity
    )
    transport = Transport(
        rank, f"tcp://{bind_host or host}:{port}", peers, cfg.gossip, cfg.security, cfg.faults,
        seed=node.cfg.seed, max_frame_bytes=bounds.frame_bytes, max_parts=MESSAGE_PARTS,
    )  # fmt: skip
    try:
        transport.start()
    except BaseException:
        node.close()
        raise
    space = node.actors.env.single_observation_space
    gossip = Gossip(
        rank, endpoints, transport, cfg.gossip,
        run_id=run_id or default_run_id(cfg.name, addresses), spec=node.spec,
        fingerprint=network_fingerprint(node.learner.online),
        bounds=ObsBounds(np.asarray(space.low), np.asarray(space.high)), seed=node.cfg.seed,
    )  # fmt: skip
    node.connect(gossip)
    return node
