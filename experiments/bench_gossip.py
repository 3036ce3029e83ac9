"""Gossip benchmark, every figure measured side by side in one run on this machine.

1. One gossip round (snapshot, encode, send, receive, validate, mix) between two
   live nodes vs a raw ZeroMQ + msgpack transfer of the same bytes (target ratio <= 1.3), for a
   ~70k-parameter MLP and a ~1.7M-parameter one (the size of the Nature CNN).
2. Training throughput of 2 local nodes with gossip on vs off (target >= 0.95).
3. `gossipdqn local -n 4` on CartPole vs one node: env steps and seconds to 475 and the final
   20-episode evaluation, every node stopping at the threshold as in bench_single.py.

    python experiments/bench_gossip.py --json experiments/results/bench_gossip.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gossipdqn.cluster.local import free_ports, run_local
from gossipdqn.config import load_config
from gossipdqn.gossip.nodes import gossip_node

HERE = Path(__file__).parent
SIZES = {"mlp_70k": [256, 256], "mlp_1.7M": [1290, 1290]}


def _bench_transport():
    spec = importlib.util.spec_from_file_location("bench_transport", HERE / "bench_transport.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_nodes(tmp: Path, hidden: list[int]):
    """Two live gossip nodes on loopback that have heard each other's hellos."""
    cfg = load_config(None, [f"network.hidden={hidden}", "gossip.max_bytes_per_s=0",
                             "gossip.experience=false"])  # fmt: skip
    addresses = [f"127.0.0.1:{p}" for p in free_ports(2)]
    nodes = [
        gossip_node(cfg, tmp / f"n{r}", rank=r, addresses=addresses, quiet=True)
        for r in range(2)
    ]  # fmt: skip
    while not all(n.exchange.alive() for n in nodes):
        for n in nodes:
            n.exchange.transport.wait(0.05)
            n.exchange.poll()
    return nodes


def gossip_round_s(sender, receiver) -> float:
    """Seconds from the sender's round to the receiver having mixed its parameters in."""
    interval = sender.cfg.gossip.interval
    before = receiver.exchange.counts.received["params"]
    began = time.perf_counter()
    sender.exchange.after_update(interval)
    while receiver.exchange.counts.received["params"] == before:
        receiver.exchange.transport.wait(1.0)
        receiver.exchange.poll()
    return time.perf_counter() - began


def round_vs_raw(hidden: list[int], rounds: int) -> dict:
    bt = _bench_transport()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = two_nodes(Path(tmp), hidden)
        try:
            n = sum(p.numel() for p in a.learner.online.parameters())
            raw, close = bt.raw_pair(np.zeros(n, np.float32), "")
            ours_s, raw_s = [], []
            for i in range(rounds):
                ours_s.append(gossip_round_s(a, b) if i % 2 else gossip_round_s(b, a))
                began = time.perf_counter()
                raw(1)
                raw_s.append(time.perf_counter() - began)
            close()
        finally:
            a.close()
            b.close()
    ours, rawm = statistics.median(ours_s), statistics.median(raw_s)
    return {"params": n, "round_ms": ours * 1e3, "raw_ms": rawm * 1e3, "ratio": ours / rawm}


def local_run(n: int, sets: list[str]) -> list[dict]:
    """Run `gossipdqn local -n N` quietly; every node's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        passthrough = ["--quiet", *[a for s in sets for a in ("--set", s)]]
        code = run_local(n, Path(tmp), passthrough, threading.Event())
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    if code != 0:
        raise RuntimeError(f"local run failed: {summary['failed']}")
    return [node["summary"] for node in summary["nodes"]]


def throughput_on_off(repeats: int, steps: int) -> dict:
    """Env steps/s per node, 2 local nodes, gossip on (defaults) vs off, alternating."""
    base = [f"train.total_steps={steps}", "eval.every_steps=0", "eval.final_episodes=1"]
    off = base + ["gossip.params=false", "gossip.experience=false"]
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(repeats):
        for mode, sets in (("on", base), ("off", off)):
            rates[mode] += [s["env_steps"] / s["wall_s"] for s in local_run(2, sets)]
    on, offm = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"env_steps_per_s_on": on, "env_steps_per_s_off": offm, "ratio": on / offm}


def four_vs_one(steps: int) -> dict:
    """CartPole: 4 gossip nodes vs 1 node, each stopping at 475 (the single-node protocol)."""
    sets = [f"train.total_steps={steps}", "train.stop_at_threshold=true"]
    four = local_run(4, sets)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gossipdqn", "train", "--quiet", "--run-dir", tmp]
        subprocess.run(cmd + [a for s in sets for a in ("--set", s)], check=True)
        one = json.loads((Path(tmp) / "summary.json").read_text())

    def row(s: dict) -> dict:
        keys = ("steps_to_threshold", "seconds_to_threshold", "final_eval_return_mean")
        return {k: s[k] for k in keys}

    return {"four_nodes": [row(s) for s in four], "one_node": row(one)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20_000, help="per node, throughput runs")
    parser.add_argument("--budget", type=int, default=50_000, help="per node, 4-vs-1 runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["round", "throughput", "four"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict = {}
    if "round" not in args.skip:
        result["round_vs_raw"] = {k: round_vs_raw(h, args.rounds) for k, h in SIZES.items()}
        print(json.dumps(result["round_vs_raw"], indent=2), flush=True)
    if "throughput" not in args.skip:
        result["throughput"] = throughput_on_off(args.repeats, args.steps)
        print(json.dumps(result["throughput"], indent=2), flush=True)
    if "four" not in args.skip:
        result["four_vs_one"] = four_vs_one(args.budget)
        print(json.dumps(result["four_vs_one"], indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
