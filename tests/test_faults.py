"""Fault tolerance: fair inbound queues, Byzantine peers, partitions, crashes and signals."""

from __future__ import annotations

import pytest

from gossipdqn.config import ConfigError, load_config
from gossipdqn.faults import Inbox

pytestmark = pytest.mark.timeout(120)


def test_inbox_serves_senders_in_turn_and_evicts_the_flooder() -> None:
    box = Inbox(limit=4)
    for i in range(10):
        box.put(b"flood", ("flood", i))
    assert len(box) == 4
    assert box.put(b"honest", ("honest", 0)) is False  # full: the longest queue lost its oldest
    assert box.take(3) == [("flood", 7), ("honest", 0), ("flood", 8)]
    assert box.take(10) == [("flood", 9)] and len(box) == 0


def test_partition_entries_are_checked_when_the_config_loads() -> None:
    assert load_config(None, ['faults.partition=["2-5:0,1|2,3"]']).faults.partition
    with pytest.raises(ConfigError, match="faults.partition '5-2:0|1'"):
        load_config(None, ['faults.partition=["5-2:0|1"]'])
