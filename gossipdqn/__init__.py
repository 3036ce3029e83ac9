"""gossipdqn: decentralized peer-to-peer deep Q-learning over ZeroMQ gossip."""

__version__ = "0.1.0"
