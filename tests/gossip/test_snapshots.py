"""Snapshot buffers: a copy at capture time, reused only once ZeroMQ has let go of it."""

import numpy as np
import torch
import zmq

from gossipdqn.gossip.snapshots import SnapshotPool


def test_snapshot_is_a_copy_sent_as_is_and_its_buffer_reused_once_released() -> None:
    flat = torch.arange(1000, dtype=torch.float32)
    pool = SnapshotPool(flat, limit=2)
    first = pool.capture(flat)
    flat.add_(1)  # training goes on; the snapshot must not follow
    assert torch.equal(first.host, torch.arange(1000, dtype=torch.float32))
    held = pool.capture(flat)  # the first frame is still referenced: a second buffer
    assert held.host.data_ptr() != first.host.data_ptr()

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("tcp://127.0.0.1:*")
        dealer.connect(router.last_endpoint.decode())
        dealer.send_multipart([b"header", first.frame], copy=False)
        got = router.recv_multipart(copy=False)
        np.testing.assert_array_equal(np.frombuffer(got[2].buffer, np.float32), np.arange(1000))
        address, tracker = first.host.data_ptr(), first.frame.tracker
        del first, got
        assert tracker.wait(10) is None and tracker.done
        again = pool.capture(flat)  # released: the same buffer, with the new values
        assert again.host.data_ptr() == address
        assert torch.equal(again.host, flat)
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def test_pool_stays_bounded_when_every_buffer_is_in_use() -> None:
    flat = torch.zeros(10)
    pool = SnapshotPool(flat, limit=2)
    kept = [pool.capture(flat) for _ in range(5)]  # all still referenced
    assert len({s.host.data_ptr() for s in kept}) == 5
    assert len(pool) == 2
