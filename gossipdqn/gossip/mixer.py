"""A node's averaging state: push-sum weight and links, the robust filter, how much it mixed."""

from __future__ import annotations

import time

import torch

from gossipdqn.config import GossipConfig
from gossipdqn.gossip.mixing import (
    AdaptiveClipThreshold,
    MixingRate,
    PushSumLinks,
    link_gain,
    pairwise_average,
    push_sum_mix_,
    robust_filter,
)
from gossipdqn.gossip.peers import Peer
from gossipdqn.gossip.topology import exponential_period, in_peers
from gossipdqn.net.wire import Message, readonly_tensor

ROBUST_RELATIVE_FLOOR = 0.01
"""tau is at least this fraction of ||θ||: honest peers that agree closely with one sender must
not refuse another that is a fraction of a percent further away (it would stall consensus)."""
MIXING_WINDOW_S = 10.0
"""`params_mixed_per_s` counts the parameter messages mixed in over this many last seconds."""


def in_sources(cfg: GossipConfig, rank: int, world: int) -> set[int]:
    """The ranks that send to `rank` over one period of the topology."""
    if world < 2:
        return set()
    timed = cfg.topology in ("exponential", "random_regular")
    rounds = exponential_period(world) if timed else 1
    return {
        s for r in range(rounds)
        for s in in_peers(cfg.topology, rank, world, r, k=cfg.degree, seed=0)
    }  # fmt: skip


class Mixer:
    """Mixes peers' parameter messages into a flat parameter vector; no I/O."""

    def __init__(self, cfg: GossipConfig, world: int, rank: int) -> None:
        self.cfg, self.world = cfg, world
        self.links = PushSumLinks()
        n_peers = max(1, world - 1)  # tau: 3x the upper median of each peer's distance
        # tau is 0 (clip to our own θ; the weight still counts) until the distances of two
        # senders are known, or of the one sender a ring gives us
        senders = min(2, len(in_sources(cfg, rank, world)))
        self.clip = AdaptiveClipThreshold(window=n_peers, initial=0.0, min_count=max(1, senders))
        self.rate = MixingRate(MIXING_WINDOW_S)
        self.rejected = 0

    @property
    def push_sum(self) -> bool:
        return self.cfg.mixing == "push_sum"

    def shares(self, targets: list[tuple[int, int]]) -> list[tuple[int, dict[str, float | int]]]:
        """What the message to each (rank, incarnation) target carries besides θ: its push-sum
        share, the link's running total, and the incarnation it is meant for."""
        if not self.push_sum:
            return [(rank, {}) for rank, _ in targets]
        incarnations = dict(targets)
        return [
            (r, {"w": w, "sum": total, "to": incarnations[r]})
            for r, w, total in self.links.split(targets)
        ]

    def mix(self, flat: torch.Tensor, peer: Peer, msg: Message, incarnation: int) -> None:
        """Mix one checked parameter message from `peer` into `flat`, in place, in one pass.

        Push-sum: θ <- (w·θ + g·θ_peer) / (w + g), w <- w + g, where g is the weight the message
        brings on its link (`link_gain`); a message `gossip.robust` refuses still brings its
        weight, mixed with our own θ. Pairwise: θ <- (θ + θ_peer) / 2. `incarnation` is ours.
        """
        gain = 1.0
        if self.push_sum:
            inc, seen = msg.meta["inc"], peer.link_seen.get(msg.meta["inc"])
            gain, seen = link_gain(
                seen, msg.meta["w"], msg.meta["sum"], addressed=msg.meta["to"] == incarnation,
                cap=float(self.world),
            )  # fmt: skip
            if seen is not None:
                peer.link_seen[inc] = seen
            if gain == 0.0:
                return  # a duplicate, or older than what the link already brought
        peer.params = readonly_tensor(msg.tensors["params"])
        peer_theta = robust_filter(
            flat.cpu(), peer.params, self.cfg.robust, self.clip, peer.address,
            relative_floor=ROBUST_RELATIVE_FLOOR,
        ) if self.cfg.robust != "none" else peer.params  # fmt: skip
        if peer_theta is None:
            self.rejected += 1
            if self.push_sum:
                self.links.weight += gain
            return
        peer_theta = peer_theta.to(flat.device, non_blocking=True)
        if self.push_sum:
            self.links.weight = push_sum_mix_(flat, self.links.weight, peer_theta, gain)
        else:
            pairwise_average(flat, peer_theta)
        self.rate.record(time.monotonic())
