"""Centralized baselines on gossip's DQN core: single node, parameter server, all-reduce."""

from __future__ import annotations


class ExchangeLost(RuntimeError):
    """A worker lost what it cannot train without (its server, its all-reduce group)."""
