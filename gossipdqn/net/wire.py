"""The codec: a msgpack header frame plus one raw frame per tensor, validated before use."""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from gossipdqn.config import GossipConfig

FORMAT_VERSION = 2
"""2: a parameters message carries de-biased parameters beside their push-sum weight."""

DTYPES: Mapping[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "uint8", "int8", "int32", "int64", "bool")
}
"""The only dtypes on the wire, always little-endian."""

_ONE_PASS_FROM = 131_072
"""Float tensors from this many elements get their extrema in one torch pass (see decode)."""
Buffer = bytes | memoryview
MetaValue = int | float | str


class Kind(enum.IntEnum):
    """What a message carries."""

    HELLO = 1
    PARAMS = 2
    EXPERIENCE = 3
    GRADIENTS = 4
    PULL = 5


class WireError(ValueError):
    """A message that cannot be encoded or must not be accepted; `reason` is a short constant."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class WireLimits:
    """Bounds on what `decode` accepts."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_total_bytes: int = 64 * 1024 * 1024
    max_dims: int = 8
    max_meta: int = 32


@dataclass(frozen=True, eq=False)
class Message:
    """One message: who sent it, when, and its tensors (ordered) and small scalar extras."""

    kind: Kind
    run_id: str
    sender: int
    seq: int
    step: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, MetaValue] = field(default_factory=dict)
    extrema: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(min, max) of each non-empty float tensor, found by `decode`'s finiteness check."""


def limits_for(gossip: GossipConfig) -> WireLimits:
    """Default limits with the total size taken from `gossip.max_message_mb`."""
    return WireLimits(max_total_bytes=int(gossip.max_message_mb * 1024 * 1024))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_meta_value(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float | str)


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and _is_meta_value(v) for k, v in meta.items()
    ):
        raise WireError("bad_header", "meta must map str to int, float or str")
    if not all(math.isfinite(v) for v in meta.values() if isinstance(v, float)):
        raise WireError("non_finite", "meta")


def _wire_array(name: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
    """The dtype name and a little-endian C-contiguous view (a copy only when needed)."""
    dtype_name = arr.dtype.name
    if dtype_name not in DTYPES:
        raise WireError(
            "bad_dtype",
            f"tensor {name!r} has dtype {arr.dtype}; expected one of " + ", ".join(DTYPES),
        )
    if arr.dtype != DTYPES[dtype_name] or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=DTYPES[dtype_name], order="C")  # keeps 0-d, unlike ascontiguous
    return dtype_name, arr


def encode(msg: Message) -> list[Buffer]:
    """The frames of `msg`: a msgpack header, then each tensor's bytes without copying."""
    if not (_is_int(msg.sender) and _is_int(msg.seq) and _is_int(msg.step) and msg.sender >= 0):
        raise WireError("bad_header", "sender, seq and step must be ints, sender >= 0")
    _check_meta(msg.meta)
    specs, buffers = [], []
    for name, arr in msg.tensors.items():
        dtype_name, arr = _wire_array(name, np.asarray(arr))
        specs.append([name, dtype_name, list(arr.shape)])
        buffers.append(memoryview(arr.reshape(-1)).cast("B"))
    header = {
        "v": FORMAT_VERSION,
        "k": int(Kind(msg.kind)),
        "r": msg.run_id,
        "s": msg.sender,
        "q": msg.seq,
        "t": msg.step,
        "m": dict(msg.meta),
        "x": specs,
    }
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as e:
        raise WireError("bad_header", str(e)) from None
    return [packed, *buffers]


def _buffer(frame: Any) -> memoryview:
    """The bytes of a zmq.Frame, bytes or memoryview, without copying."""
    buf = getattr(frame, "buffer", frame)
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _unpack_header(raw: memoryview, limits: WireLimits) -> dict[str, Any]:
    if len(raw) > limits.max_header_bytes:
        raise WireError("oversized", f"header of {len(raw)} bytes")
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_header_bytes,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=max(limits.max_tensors, limits.max_dims, 3),
            max_map_len=max(limits.max_meta, 8),
        )
    except ValueError as e:
        reason = "truncated" if "incomplete" in str(e) else "bad_header"
        raise WireError(reason, type(e).__name__) from None
    except Exception as e:  # noqa: BLE001 - hostile bytes may raise anything inside msgpack
        raise WireError("bad_header", type(e).__name__) from None
    if not isinstance(header, dict):
        raise WireError("bad_header", "header is not a map")
    return header


def _check_envelope(header: Mapping[str, Any], run_id: str | None) -> Kind:
    if header.get("v") != FORMAT_VERSION or not _is_int(header.get("v")):
        raise WireError("bad_version", f"expected format {FORMAT_VERSION}")
    if set(header) != {"v", "k", "r", "s", "q", "t", "m", "x"}:
        raise WireError("bad_header", "wrong header fields")
    if not all(_is_int(header[k]) for k in "kstq") or header["s"] < 0:
        raise WireError("bad_header", "kind, sender, seq and step must be ints")
    if not isinstance(header["r"], str) or not isinstance(header["x"], list):
        raise WireError("bad_header", "run id must be a string and tensors a list")
    _check_meta(header["m"])
    try:
        kind = Kind(header["k"])
    except ValueError:
        raise WireError("bad_kind", f"unknown kind {header['k']}") from None
    if run_id is not None and header["r"] != run_id:
        raise WireError("wrong_run_id", f"got {header['r']!r}")
    return kind


def _check_spec(spec: Any, limits: WireLimits) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """(name, dtype, shape, byte length) of one tensor entry of the header."""
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)):
        raise WireError("bad_header", "tensor entry must be [name, dtype, shape]")
    name, dtype_name, shape = spec
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise WireError("bad_dtype", f"tensor {name!r}: {dtype_name!r}")
    if not isinstance(shape, list) or len(shape) > limits.max_dims:
        raise WireError(
            "bad_shape", f"tensor {name!r}: shape must be a list of <= {limits.max_dims} dims"
        )
    if not all(_is_int(d) and 0 <= d <= limits.max_total_bytes for d in shape):
        raise WireError("bad_shape", f"tensor {name!r}: dims must be ints in [0, max bytes]")
    dtype = DTYPES[dtype_name]
    return name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize


def _check_expected(
    specs: Sequence[tuple[str, np.dtype, tuple[int, ...], int]],
    expected: Mapping[str, tuple[str, tuple[int, ...]]],
) -> None:
    got = {name: (dtype.name, shape) for name, dtype, shape, _ in specs}
    want = {name: (dtype, tuple(shape)) for name, (dtype, shape) in expected.items()}
    if got != want:
        raise WireError(
            "unexpected_tensor", "tensors differ from the expected names, dtypes or shapes"
        )


def decode(
    frames: Sequence[Any],
    limits: WireLimits,
    *,
    run_id: str | None,
    expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
) -> Message:
    """Validate `frames` and return the message, its arrays read-only views on the frames."""
    if not frames:
        raise WireError("frame_count", "no frames")
    if len(frames) - 1 > limits.max_tensors:
        raise WireError("oversized", f"{len(frames) - 1} tensor frames")
    header = _unpack_header(_buffer(frames[0]), limits)
    kind = _check_envelope(header, run_id)
    specs = [_check_spec(spec, limits) for spec in header["x"]]
    if len(specs) != len(frames) - 1:
        raise WireError("frame_count", f"{len(specs)} tensors for {len(frames) - 1} frames")
    if len({name for name, *_ in specs}) != len(specs):
        raise WireError("bad_header", "duplicate tensor names")
    if sum(nbytes for *_, nbytes in specs) > limits.max_total_bytes:
        raise WireError("oversized", "tensors exceed max total bytes")
    if expected is not None:
        _check_expected(specs, expected)
    tensors, extrema = {}, {}
    for (name, dtype, shape, nbytes), frame in zip(specs, frames[1:]):
        buf = _buffer(frame)
        if len(buf) != nbytes:
            raise WireError("frame_length", f"tensor {name!r}: {len(buf)} bytes, expected {nbytes}")
        arr = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)
        arr.flags.writeable = False
        if dtype.kind == "f" and arr.size:
            low, high = _finite_extrema(arr)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise WireError("non_finite", f"tensor {name!r}")
            extrema[name] = (low, high)
        tensors[name] = arr
    meta = header["m"]
    return Message(kind, header["r"], header["s"], header["q"], header["t"], tensors, meta, extrema)


def _finite_extrema(arr: np.ndarray) -> tuple[float, float]:
    """(min, max), NaN when any value is NaN, so one check also finds non-finite values.

    Large arrays take torch's single pass; small ones numpy's two, which cost less than a call
    into torch.
    """
    if arr.size < _ONE_PASS_FROM:
        return float(arr.min()), float(arr.max())
    low, high = torch.aminmax(readonly_tensor(arr.reshape(-1)))
    return float(low), float(high)


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a received (read-only) frame buffer, without copying it; never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def tensors_from_state(named_tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A contiguous CPU numpy snapshot, one copy per tensor, never aliasing the live tensors."""
    out = {}
    for name, tensor in named_tensors.items():
        t = tensor.detach()
        try:
            if t.device.type == "cpu":
                out[name] = np.array(t.numpy(), order="C")
            else:
                out[name] = np.ascontiguousarray(t.cpu().numpy())
        except TypeError as e:
            raise WireError("bad_dtype", f"tensor {name!r}: {e}") from None
    return out
