"""What a hello must hold before a node takes it: checked on the decoded message, no socket."""

import numpy as np
import pytest

from gossipdqn.gossip.checks import Rejected, check_hello
from gossipdqn.net.wire import Kind, Message

FP = "our-network"


def hello(tensors=None, **meta):
    meta = {"addr": "tcp://a:1", "fp": FP} | meta
    return Message(Kind.HELLO, "run", 1, 1, 0, tensors or {}, meta)


@pytest.mark.parametrize("meta", [{}, {"mix": 0, "go": 1}, {"mix": 1, "go": 0}])
def test_a_well_formed_hello_is_taken(meta):
    check_hello(hello(**meta), FP)


@pytest.mark.parametrize("message, reason", [
    (hello(mix=5), "bad_hello"),
    (hello(go=2), "bad_hello"),
    (hello(go="yes"), "bad_hello"),
    (hello(addr=7), "bad_hello"),
    (hello({"x": np.zeros(2, np.float32)}), "bad_hello"),
    (hello(fp="another network"), "fingerprint"),
], ids=["mix", "go", "go-str", "addr", "tensors", "fingerprint"])  # fmt: skip
def test_a_malformed_hello_is_refused_with_its_reason(message, reason):
    with pytest.raises(Rejected) as refused:
        check_hello(message, FP)
    assert refused.value.reason == reason
