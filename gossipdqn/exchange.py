"""The `Exchange` protocol: how a node trades knowledge with others.

Gossip (`gossip.protocol.Gossip`), the parameter server (`baselines.ps.ServerExchange`) and
all-reduce (`baselines.allreduce.AllReduceExchange`) implement it, so a comparison of them
changes one thing only. The node calls it in this order::

    node.connect(exchange)              -> exchange.attach(learner, replay)      once
    node.run(stop)                      -> exchange.rendezvous(stop)             once, first
    while training:
        actors step the environments    -> exchange.after_env_step(steps, batch) every step
        each learner update due         -> exchange.after_update(updates)        every update
        each metrics record             -> exchange.metrics()                    merged in
        each checkpoint                 -> exchange.state_dict()                 saved
    node.restore(checkpoint)            -> exchange.load_state_dict(state)       on resume
    node.finish() / node.close()        -> exchange.metrics(), exchange.close()  once

Every call but `rendezvous` returns promptly: an exchange that talks to the network does so on
its own thread or without blocking, so the learner never waits on a peer once training began.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import threading

    from gossipdqn.dqn.learner import Learner
    from gossipdqn.dqn.replay import ReplayBuffer
    from gossipdqn.types import Transitions


class Exchange(Protocol):
    """How a node trades knowledge with others (gossip, a parameter server, all-reduce)."""

    def attach(self, learner: Learner, replay: ReplayBuffer) -> None:
        """Called once, when the node has built the parts the exchange works on."""

    def rendezvous(self, stop: threading.Event) -> None:
        """Called once as training begins; may wait, bounded and until `stop`, for the others."""

    def after_env_step(self, env_steps: int, transitions: Transitions) -> None:
        """Called after every actor step with the transitions it produced."""

    def after_update(self, updates: int) -> None:
        """Called after every learner update."""

    def metrics(self) -> dict[str, Any]:
        """Cumulative counters and rates, merged into the node's metrics records."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed node needs to go on (saved in its checkpoint); may be empty."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state_dict()`'s result, after the learner and replay are restored."""

    def close(self) -> None:
        """Release sockets and threads; called once, last."""
