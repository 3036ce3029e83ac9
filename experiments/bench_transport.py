"""Transfer time of one parameter message: raw ZeroMQ + msgpack vs gossipdqn's wire + transport.

Raw: a DEALER sends a msgpack header and one raw frame (copy=False) to a ROUTER on loopback TCP,
which unpacks the header and views the frame with numpy. Ours: `wire.encode` + `Transport.send`
on one node, `Transport.wait/receive` + `wire.decode` (full validation) on the other. Both with
CURVE off and on; configurations are interleaved round by round and medians reported.

    python experiments/bench_transport.py --rounds 5 --json experiments/results/bench_transport.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import zmq

from gossipdqn.config import FaultsConfig, GossipConfig, SecurityConfig
from gossipdqn.net.keys import generate_keys, load_node_keys
from gossipdqn.net.transport import Transport
from gossipdqn.net.wire import Kind, Message, WireLimits, decode, encode

SIZES = {"cartpole_mlp": 70_000, "nature_cnn": 1_700_000}
LOCAL = "tcp://127.0.0.1:*"
BURST = 8  # messages in flight at once in the burst runs (the default gossip.queue_messages)
Transfer = Callable[[int], None]  # moves `burst` messages: all sent, then all received


def raw_pair(params: np.ndarray, keys_dir: str) -> tuple[Transfer, Callable]:
    """Raw DEALER->ROUTER transfers, one context each (as two nodes); CURVE when `keys_dir`."""
    contexts = zmq.Context(), zmq.Context()
    router, dealer = contexts[0].socket(zmq.ROUTER), contexts[1].socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.linger = 0
    if keys_dir:
        server, client = load_node_keys(keys_dir, 1), load_node_keys(keys_dir, 0)
        router.curve_server, router.curve_secretkey = True, server.secret
        router.curve_publickey = server.public
        dealer.curve_serverkey = server.public
        dealer.curve_publickey, dealer.curve_secretkey = client.public, client.secret
    router.bind(LOCAL)
    dealer.connect(router.last_endpoint.decode())

    def transfer(burst: int) -> None:
        for _ in range(burst):
            header = msgpack.packb({"dtype": "float32", "shape": list(params.shape)})
            dealer.send_multipart([header, params], copy=False)
        for _ in range(burst):
            frames = router.recv_multipart(copy=False)
            meta = msgpack.unpackb(frames[1].buffer, raw=False)
            np.frombuffer(frames[2].buffer, dtype=meta["dtype"]).reshape(meta["shape"])

    def close() -> None:
        router.close(linger=0)
        dealer.close(linger=0)
        for ctx in contexts:
            ctx.term()

    return transfer, close


def transport_pair(params: np.ndarray, keys_dir: str) -> tuple[Transfer, Callable]:
    """One wire+transport transfer per call from node 0 to node 1."""
    gossip = GossipConfig(max_bytes_per_s=0.0, max_message_mb=64.0)
    security = SecurityConfig(keys_dir=keys_dir)
    b = Transport(1, LOCAL, {}, gossip, security, FaultsConfig())
    b.start()
    a = Transport(0, LOCAL, {1: b.bound_address}, gossip, security, FaultsConfig())
    a.start()
    limits, expected = WireLimits(), {"params": ("float32", params.shape)}
    seq = iter(range(1 << 62))

    def transfer(burst: int) -> None:
        for _ in range(burst):
            msg = Message(Kind.PARAMS, "bench", 0, next(seq), 0, {"params": params}, {"w": 0.5})
            a.send(1, encode(msg))
        for _ in range(burst):
            got: list = []
            while not got:
                if not b.wait(10.0):
                    raise TimeoutError(f"message lost: {a.stats()} {b.stats()}")
                got = b.receive(1)
            decode(got[0].frames, limits, run_id="bench", expected=expected)

    return transfer, lambda: (a.close(), b.close())


def time_transfers(transfer: Transfer, count: int, burst: int) -> list[float]:
    """Seconds per message of `count` timed transfers of `burst` messages each."""
    transfer(1)  # warm: connection and handshake done
    out = []
    for _ in range(count):
        start = time.perf_counter()
        transfer(burst)
        out.append((time.perf_counter() - start) / burst)
    return out


def bench_size(n: int, rounds: int, count: int, keys_dir: str) -> dict[str, float]:
    """Median seconds per transfer for each configuration, interleaved round by round."""
    params = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    pairs = {
        "raw": raw_pair(params, ""),
        "raw_curve": raw_pair(params, keys_dir),
        "transport": transport_pair(params, ""),
        "transport_curve": transport_pair(params, keys_dir),
    }
    samples: dict[str, list[float]] = {f"{k}{m}": [] for k in pairs for m in ("", "_burst")}
    try:
        for _ in range(rounds):
            for name, (transfer, _) in pairs.items():
                samples[name] += time_transfers(transfer, count, 1)
                samples[f"{name}_burst"] += time_transfers(transfer, max(1, count // BURST), BURST)
    finally:
        for _, close in pairs.values():
            close()
    return {name: statistics.median(s) for name, s in samples.items()}


def ratios(med: dict[str, float], mode: str) -> dict[str, float]:
    """Transport over raw (CURVE off and on) and CURVE over plain, for one mode."""
    return {
        f"transport_over_raw{mode}": med[f"transport{mode}"] / med[f"raw{mode}"],
        f"transport_over_raw_curve{mode}": med[f"transport_curve{mode}"] / med[f"raw_curve{mode}"],
        f"curve_over_plain_transport{mode}": med[f"transport_curve{mode}"]
        / med[f"transport{mode}"],
        f"curve_over_plain_raw{mode}": med[f"raw_curve{mode}"] / med[f"raw{mode}"],
    }


def print_row(label: str, r: dict[str, float]) -> None:
    for mode, title in (("", "one at a time"), ("_burst", f"bursts of {BURST}")):
        print(
            f"{label:12s} {r['mbytes']:5.2f} MB {title:14s} | raw {r[f'raw{mode}_ms']:7.3f} ms"
            f"  ours {r[f'transport{mode}_ms']:7.3f} ms  x{r[f'transport_over_raw{mode}']:.2f}"
            f" | CURVE raw {r[f'raw_curve{mode}_ms']:7.3f}"
            f"  ours {r[f'transport_curve{mode}_ms']:7.3f}"
            f"  x{r[f'transport_over_raw_curve{mode}']:.2f}"
            f" | CURVE/plain ours x{r[f'curve_over_plain_transport{mode}']:.2f}"
            f" raw x{r[f'curve_over_plain_raw{mode}']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--count", type=int, default=20, help="transfers per config per round")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as keys_dir:
        generate_keys(keys_dir, 2)
        for label, n in SIZES.items():
            med = bench_size(n, args.rounds, args.count, keys_dir)
            results[label] = {"floats": n, "mbytes": n * 4 / 1e6}
            results[label].update({f"{k}_ms": v * 1e3 for k, v in med.items()})
            for mode in ("", "_burst"):
                results[label].update(ratios(med, mode))
            print_row(label, results[label])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
