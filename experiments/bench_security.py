"""What security costs: CURVE on vs off, and a node's memory and speed under a flooding peer.

1. Message throughput of the Nature-CNN parameter message (6.8 MB) through wire + transport,
   CURVE off and on, interleaved (bench_transport's measurement, reused).
2. Training throughput of a 2-node `gossipdqn local` run at the default gossip settings, CURVE
   off and on, interleaved; env steps/s and updates/s per node from each node's summary.
3. `--soak-minutes M`: one node trains while a fake peer (rank 1, no CURVE) floods it with hostile
   messages; the node's RSS and env steps/s before the flood and at its end.

    python experiments/bench_security.py --json experiments/results/security/bench.json
    python experiments/bench_security.py --skip-throughput --soak-minutes 10 \
        --json experiments/results/security/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from bench_transport import SIZES, bench_size

from gossipdqn.cluster.local import free_ports, node_command
from gossipdqn.cluster.procs import stop as stop_processes
from gossipdqn.net.keys import generate_keys
from gossipdqn.net.wire import Kind, Message, encode
from gossipdqn.node.node import default_run_id

TRAIN_SETS = ["train.stop_at_threshold=false", "eval.every_steps=0", "train.log_every_steps=500"]


def message_throughput(rounds: int, count: int) -> dict[str, float]:
    """Nature-CNN parameter messages per second through wire + transport, CURVE off and on."""
    with tempfile.TemporaryDirectory() as keys_dir:
        generate_keys(keys_dir, 2)
        med = bench_size(SIZES["nature_cnn"], rounds, count, keys_dir)
    out = {}
    for name in ("transport", "transport_curve", "transport_burst", "transport_curve_burst"):
        out[f"{name}_msgs_per_s"] = 1.0 / med[name]
        out[f"{name}_mb_per_s"] = SIZES["nature_cnn"] * 4 / 1e6 / med[name]
    out["curve_over_plain_msgs"] = out["transport_curve_msgs_per_s"] / out["transport_msgs_per_s"]
    out["curve_over_plain_msgs_burst"] = (
        out["transport_curve_burst_msgs_per_s"] / out["transport_burst_msgs_per_s"]
    )
    return out


def local_run(run_dir: Path, steps: int, extra: list[str]) -> dict[str, float]:
    """A 2-node `gossipdqn local` run; mean env steps/s and updates/s over its nodes."""
    sets = [a for s in [*TRAIN_SETS, f"train.total_steps={steps}", *extra] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "gossipdqn", "local", "-n", "2", "--run-dir", str(run_dir)]
    subprocess.run([*cmd, *sets, "--quiet"], check=True, timeout=1800, capture_output=True)
    nodes = [json.loads((run_dir / f"node-{r}" / "summary.json").read_text()) for r in range(2)]
    return {
        "env_steps_per_s": statistics.mean(n["env_steps"] / n["wall_s"] for n in nodes),
        "updates_per_s": statistics.mean(n["updates"] / n["wall_s"] for n in nodes),
        "recv_params": statistics.mean(n["exchange"]["gossip_recv_params"] for n in nodes),
    }


def training_throughput(rounds: int, steps: int, config: str | None) -> dict[str, object]:
    """CURVE off vs on, `rounds` interleaved runs each; medians and their ratio."""
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "curve": []}
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = Path(tmp) / "keys"
        generate_keys(keys_dir, 2)
        extra = [f'--config="{config}"'] if config else []
        for i in range(rounds):
            for mode in runs:
                sets = [f'security.keys_dir="{keys_dir}"'] if mode == "curve" else []
                run = local_run(Path(tmp) / f"{mode}-{i}", steps, sets + extra)
                print(f"  {mode} round {i}: {run}", flush=True)
                runs[mode].append(run)
    med = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()
    }
    return {
        "runs": runs,
        "median": med,
        "env_steps_ratio": med["curve"]["env_steps_per_s"] / med["plain"]["env_steps_per_s"],
        "updates_ratio": med["curve"]["updates_per_s"] / med["plain"]["updates_per_s"],
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def hostile_messages(run_id: str, n_params: int) -> list[list]:
    """A cycle of messages a node must refuse: junk, wrong shapes, NaN, wrong sender, replays."""
    rng = np.random.default_rng(0)
    bad = np.full(n_params, np.nan, np.float32)
    wrong = rng.standard_normal(n_params + 1).astype(np.float32)

    def msg(kind: Kind, sender: int, tensors: dict, **meta: object) -> list:
        return encode(Message(kind, run_id, sender, 1, 0, tensors, {"inc": 1, **meta}))

    return [
        [rng.bytes(64)],
        [rng.bytes(16), rng.bytes(4096)],
        msg(Kind.PARAMS, 1, {"params": bad}, round=1, w=0.5),
        msg(Kind.PARAMS, 1, {"params": wrong}, round=1, w=0.5),
        msg(Kind.PARAMS, 0, {"params": wrong[:-1]}, round=1, w=0.5),
        msg(Kind.HELLO, 1, {}, addr="x", fp="not ours"),
    ]


def flood(address: str, messages: list[list], rate: float, seconds: float) -> int:
    """Send `messages` round and round at up to `rate` per second; how many were sent."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger, sock.sndhwm, sock.identity = 0, 1000, b"1"
    sock.connect(f"tcp://{address}")
    sent, start = 0, time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            if sent >= elapsed * rate:
                time.sleep(min(0.01, sent / rate - elapsed))  # pacing the flood, not a wait
                continue
            try:
                sock.send_multipart(messages[sent % len(messages)], zmq.NOBLOCK, copy=False)
                sent += 1
            except zmq.Again:
                time.sleep(0.001)
    finally:
        sock.close(linger=0)
        ctx.term()
    return sent


def speed_between(run_dir: Path, start: float, end: float = float("inf")) -> float:
    """Median env steps/s of the node's metric records with train time in [start, end]."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(
        r["env_steps_per_s"] for r in records
        if "env_steps_per_s" in r and start <= r["wall_s"] <= end
    )  # fmt: skip


def train_s(run_dir: Path) -> float:
    """Train time of the node's latest metric record."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["wall_s"] if lines else 0.0


def soak(minutes: float, warm_s: float, rate: float, n_params: int) -> dict[str, float]:
    """One node; `warm_s` of quiet training, then `minutes` of flood; RSS and speed both ways."""
    peers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        sets = [*TRAIN_SETS, "train.total_steps=1000000000", "checkpoint.every_steps=0"]
        cmd = node_command(0, peers, run_dir, [a for s in sets for a in ("--set", s)], resume=False)
        proc = subprocess.Popen([*cmd, "--quiet"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(warm_s)  # a benchmark phase of fixed length, not a wait for a peer
            node_dir = run_dir / "node-0"
            rss_start, flood_from = rss_mib(proc.pid), train_s(node_dir)
            messages = hostile_messages(default_run_id("run", peers), n_params)
            sent = flood(peers[0], messages, rate, minutes * 60)
            rss_end, flood_to = rss_mib(proc.pid), train_s(node_dir)
            quiet = speed_between(node_dir, warm_s / 3, flood_from)
            flooded = speed_between(node_dir, (flood_from + flood_to) / 2)  # its second half
        finally:
            stop_processes([proc], grace_s=10)
        summary = json.loads((run_dir / "node-0" / "summary.json").read_text())
    return {
        "flood_messages": sent, "flood_rate": sent / (minutes * 60),
        "rss_start_mib": rss_start, "rss_end_mib": rss_end, "rss_growth_mib": rss_end - rss_start,
        "env_steps_per_s_quiet": quiet, "env_steps_per_s_flooded": flooded,
        "speed_ratio": flooded / quiet,
        "dropped": {k: v for k, v in summary["exchange"].items() if k.startswith("dropped_")},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measure")
    parser.add_argument("--count", type=int, default=10, help="messages per config per round")
    parser.add_argument("--steps", type=int, default=30_000, help="env steps of each local run")
    parser.add_argument("--config", help="config of the training runs (default: CartPole)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the soak")
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="0 skips the soak")
    parser.add_argument("--soak-warm-s", type=float, default=60.0, help="quiet phase first")
    parser.add_argument("--flood-rate", type=float, default=1000.0, help="messages per second")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    results: dict[str, object] = {"cpus": os.cpu_count()}
    if not args.skip_throughput:
        results["message"] = message_throughput(args.rounds, args.count)
        print("message throughput:", json.dumps(results["message"], indent=1), flush=True)
        results["training"] = training_throughput(args.rounds, args.steps, args.config)
        print("training:", json.dumps(results["training"]["median"], indent=1), flush=True)
    if args.soak_minutes > 0:
        n_params = 17_410  # CartPole's default 128x128 MLP, so some floods match its size
        results["soak"] = soak(args.soak_minutes, args.soak_warm_s, args.flood_rate, n_params)
        print("soak:", json.dumps(results["soak"], indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
