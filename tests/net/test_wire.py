"""The codec: round trips, zero-copy views, and rejection of every malformed input by reason."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossipdqn.config import GossipConfig
from gossipdqn.net.wire import (
    DTYPES,
    FORMAT_VERSION,
    Kind,
    Message,
    WireError,
    WireLimits,
    decode,
    encode,
    limits_for,
    tensors_from_state,
)

LIMITS = WireLimits(max_total_bytes=1 << 20)


def sample(kind: Kind = Kind.PARAMS, **tensors: np.ndarray) -> Message:
    tensors = tensors or {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4)}
    meta = {"weight": 0.5, "round": 3, "addr": "tcp://127.0.0.1:5000"}
    return Message(kind, "run-a", 2, 7, 1000, tensors, meta)


def assert_same(a: Message, b: Message) -> None:
    assert (a.kind, a.run_id, a.sender, a.seq, a.step, a.meta) == (
        b.kind,
        b.run_id,
        b.sender,
        b.seq,
        b.step,
        b.meta,
    )
    assert list(a.tensors) == list(b.tensors)
    for name, arr in a.tensors.items():
        other = b.tensors[name]
        assert (arr.dtype.name, arr.shape) == (other.dtype.name, other.shape)
        np.testing.assert_array_equal(arr, other)


def header_of(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg)[0], raw=False)


def with_header(msg: Message, header: dict) -> list:
    return [msgpack.packb(header, use_bin_type=True), *encode(msg)[1:]]


def reason_of(frames: list, **kwargs) -> str:
    with pytest.raises(WireError) as info:
        decode(frames, kwargs.pop("limits", LIMITS), run_id=kwargs.pop("run_id", "run-a"), **kwargs)
    return info.value.reason


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_kind(kind: Kind) -> None:
    msg = sample(kind)
    assert_same(decode(encode(msg), LIMITS, run_id="run-a"), msg)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    arr = (np.arange(int(np.prod(shape))) % 2).astype(dtype).reshape(shape)
    msg = sample(x=arr)
    out = decode(encode(msg), LIMITS, run_id=None)
    assert_same(out, msg)
    assert out.tensors["x"].dtype == DTYPES[dtype]


def test_encode_views_contiguous_arrays_and_fixes_the_rest() -> None:
    arr = np.arange(20, dtype=np.float32)
    frames = encode(sample(a=arr, t=np.arange(6.0).reshape(2, 3).T, be=np.arange(3, dtype=">i4")))
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), arr)
    out = decode(frames, LIMITS, run_id="run-a")
    np.testing.assert_array_equal(out.tensors["t"], np.arange(6.0).reshape(2, 3).T)
    np.testing.assert_array_equal(out.tensors["be"], [0, 1, 2])


def test_decode_is_zero_copy_on_zmq_frames() -> None:
    frames = [zmq.Frame(bytes(f)) for f in encode(sample())]
    out = decode(frames, LIMITS, run_id="run-a")
    arr = out.tensors["w"]
    frame_address = np.frombuffer(frames[1].buffer, np.uint8).ctypes.data
    assert arr.ctypes.data == frame_address
    assert not arr.flags.writeable


def test_expected_tensors_accept_exact_match() -> None:
    expected = {"w": ("float32", (3, 4)), "b": ("float64", (4,))}
    decode(encode(sample()), LIMITS, run_id="run-a", expected=expected)


@pytest.mark.parametrize(
    "expected",
    [
        {"w": ("float32", (3, 4))},
        {"w": ("float32", (4, 3)), "b": ("float64", (4,))},
        {"w": ("float16", (3, 4)), "b": ("float64", (4,))},
        {"w": ("float32", (3, 4)), "c": ("float64", (4,))},
    ],
)
def test_rejects_tensors_other_than_expected(expected: dict) -> None:
    assert reason_of(encode(sample()), expected=expected) == "unexpected_tensor"


def test_rejects_truncated_header() -> None:
    frames = encode(sample())
    assert reason_of([bytes(frames[0])[:-3], *frames[1:]]) == "truncated"


@pytest.mark.parametrize(
    "garbage", [b"\xc1", b"\xff\x00garbage", b"", b"\x93\x01\x02\x03", b"\x05"]
)
def test_rejects_garbage_header(garbage: bytes) -> None:
    assert reason_of([garbage, *encode(sample())[1:]]) in ("bad_header", "truncated")


def test_rejects_deep_nesting() -> None:
    assert reason_of([b"\x91" * 30_000 + b"\xc0"]) == "bad_header"
    header = header_of(sample())
    nested: list = [1]
    for _ in range(50):
        nested = [nested]
    header["m"] = {"deep": nested}
    assert reason_of(with_header(sample(), header)) == "bad_header"


def test_rejects_oversized() -> None:
    big = sample(x=np.zeros(300_000, np.float32))
    assert reason_of(encode(big)) == "oversized"
    assert reason_of([b"\x80" * (LIMITS.max_header_bytes + 1)]) == "oversized"
    assert reason_of([b"", *[b""] * (LIMITS.max_tensors + 1)]) == "oversized"


def test_limits_follow_gossip_config() -> None:
    assert limits_for(GossipConfig(max_message_mb=2.0)).max_total_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"v": FORMAT_VERSION + 1}, "bad_version"),
        ({"v": "1"}, "bad_version"),
        ({"k": 99}, "bad_kind"),
        ({"r": "run-b"}, "wrong_run_id"),
        ({"x": [["w", "complex64", [3, 4]], ["b", "float64", [4]]]}, "bad_dtype"),
        ({"x": [["w", "object", [3, 4]], ["b", "float64", [4]]]}, "bad_dtype"),
        ({"x": [["w", "float32", [2**40]], ["b", "float64", [4]]]}, "bad_shape"),
        ({"x": [["w", "float32", [2**20, 2**20]], ["b", "float64", [4]]]}, "oversized"),
        ({"x": [["w", "float32", [-3, -4]], ["b", "float64", [4]]]}, "bad_shape"),
        ({"x": [["w", "float32", [1] * 9], ["b", "float64", [4]]]}, "bad_shape"),
        ({"x": [["w", "float32", [3, 4]]]}, "frame_count"),
        ({"x": [["w", "float32", [3, 5]], ["b", "float64", [4]]]}, "frame_length"),
        ({"x": [["w", "float32", [3, 4]], ["w", "float64", [4]]]}, "bad_header"),
        ({"s": "2"}, "bad_header"),
        ({"s": -1}, "bad_header"),
        ({"q": 1.5}, "bad_header"),
        ({"t": True}, "bad_header"),
        ({"r": 5}, "bad_header"),
        ({"m": {"a": [1]}}, "bad_header"),
        ({"m": [1, 2]}, "bad_header"),
        ({"x": {"w": 1}}, "bad_header"),
        ({"x": [["w", "float32"], ["b", "float64", [4]]]}, "bad_header"),
        ({"x": [["w", "float32", 12], ["b", "float64", [4]]]}, "bad_shape"),
        ({"extra": 1}, "bad_header"),
    ],
)
def test_rejects_bad_header_fields(change: dict, reason: str) -> None:
    header = header_of(sample()) | change
    assert reason_of(with_header(sample(), header)) == reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rejects_non_finite_meta(bad: float) -> None:
    header = header_of(sample()) | {"m": {"weight": bad}}
    assert reason_of(with_header(sample(), header)) == "non_finite"


def test_rejects_bytes_meta_key() -> None:
    header = header_of(sample()) | {"m": {b"": 1}}
    assert reason_of(with_header(sample(), header)) == "bad_header"


def test_rejects_missing_header_field() -> None:
    header = header_of(sample())
    del header["q"]
    assert reason_of(with_header(sample(), header)) == "bad_header"


def test_rejects_frame_count_and_length_mismatch() -> None:
    frames = encode(sample())
    assert reason_of(frames[:-1]) == "frame_count"
    assert reason_of([*frames, b"\x00" * 4]) == "frame_count"
    assert reason_of([frames[0], bytes(frames[1])[:-1], frames[2]]) == "frame_length"
    assert reason_of([]) == "frame_count"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_rejects_non_finite(bad: float, dtype: str) -> None:
    arr = np.zeros(5, dtype=dtype)
    arr[3] = bad
    assert reason_of(encode(sample(x=arr))) == "non_finite"


def test_decode_reports_each_float_tensors_extrema() -> None:
    arr = np.array([[0.5, -3.25], [7.0, 1.0]], dtype=np.float32)
    out = decode(encode(sample(x=arr, i=np.arange(3), e=np.zeros(0))), LIMITS, run_id="run-a")
    assert out.extrema == {"x": (-3.25, 7.0)}  # integer and empty tensors have none
    big = np.linspace(-2.0, 3.0, 200_000, dtype=np.float32)  # large: torch's one-pass path
    assert decode(encode(sample(x=big)), LIMITS, run_id=None).extrema == {"x": (-2.0, 3.0)}
    for bad in (np.nan, np.inf, -np.inf):
        big[-1] = bad
        assert reason_of(encode(sample(x=big))) == "non_finite"


def test_encode_rejects_what_it_cannot_send() -> None:
    with pytest.raises(WireError, match="bad_dtype"):
        encode(sample(x=np.zeros(2, np.complex64)))
    with pytest.raises(WireError, match="bad_header"):
        encode(Message(Kind.HELLO, "r", 0, 0, 0, {}, {"nested": [1]}))  # type: ignore[dict-item]
    with pytest.raises(WireError, match="bad_header"):
        encode(Message(Kind.HELLO, "r", 0, 2**70, 0))
    with pytest.raises(WireError, match="non_finite"):
        encode(Message(Kind.HELLO, "r", 0, 0, 0, {}, {"weight": float("nan")}))


def test_tensors_from_state_is_a_contiguous_snapshot() -> None:
    net = torch.nn.Linear(3, 2)
    state = {"weight": net.weight, "bias_t": net.bias.detach().unsqueeze(0).t()}
    arrays = tensors_from_state(state)
    assert arrays["weight"].dtype == np.float32 and arrays["weight"].flags.c_contiguous
    assert arrays["bias_t"].shape == (2, 1) and arrays["bias_t"].flags.c_contiguous
    before = arrays["weight"].copy()
    with torch.no_grad():
        net.weight.add_(1.0)
    np.testing.assert_array_equal(arrays["weight"], before)
    out = decode(encode(sample(**arrays)), LIMITS, run_id="run-a")
    np.testing.assert_array_equal(out.tensors["weight"], before)
    with pytest.raises(WireError, match="bad_dtype"):
        tensors_from_state({"x": torch.zeros(2, dtype=torch.bfloat16)})


def _mutate(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    frames = list(frames)
    op = data.draw(st.sampled_from(["flip", "cut", "grow", "drop", "dup", "swap", "replace"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[i])
    if op == "flip" and frame:
        j = data.draw(st.integers(0, len(frame) - 1))
        frame[j] = data.draw(st.integers(0, 255))
    elif op == "cut":
        frame = frame[: data.draw(st.integers(0, len(frame)))]
    elif op == "grow":
        frame += data.draw(st.binary(max_size=16))
    elif op == "drop":
        return frames[:i] + frames[i + 1 :]
    elif op == "dup":
        return frames[: i + 1] + frames[i:]
    elif op == "swap":
        j = data.draw(st.integers(0, len(frames) - 1))
        frames[i], frames[j] = frames[j], frames[i]
        return frames
    else:
        frame = bytearray(data.draw(st.binary(max_size=64)))
    frames[i] = bytes(frame)
    return frames


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_messages_decode_equal_or_raise_wire_error(data: st.DataObject) -> None:
    msg = sample(Kind.EXPERIENCE, obs=np.arange(8, dtype=np.uint8), r=np.zeros(2, np.float16))
    frames = [bytes(f) for f in encode(msg)]
    for _ in range(data.draw(st.integers(1, 3))):
        frames = _mutate(frames, data)
    try:
        out = decode(frames, LIMITS, run_id=None)
    except WireError:
        return
    if frames == [bytes(f) for f in encode(msg)]:
        assert_same(out, msg)
    assert_same(decode(encode(out), LIMITS, run_id=None), out)
