"""The GPU acceptance of issue 12 in one run: one JSON line per figure on stdout.

1. `gossipdqn train` on CartPole with `learner.device` set: env steps and seconds to 475;
2. Nature-CNN learner updates/s (replay sampling included) at batch 32, 256 and 512 against a
   bare PyTorch loop on batches already on the same device;
3. Pong env frames/s of a node fed by 15 actor processes against the raw vector env stepped in
   as many processes, and the learner's updates/s with those actors running against alone;
4. 8 local gossip nodes sharing the device on MinAtar Breakout against one node alone.

    python experiments/gpu_check.py --device cuda         # under 8 minutes on an H100/H200
    python experiments/gpu_check.py --device cpu --tiny   # the same code at a size for seconds

The figures reuse the benchmarks' own measurements (`bench_throughput.py`) and the launcher
(`gossipdqn.cluster.local`); `--figures` runs some of them; a figure that fails prints a line
with its error and the others still run (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_throughput import bare_rate, learner_alone_rate, node_rate, raw_env_rate

from gossipdqn import cli
from gossipdqn.cluster.local import run_local
from gossipdqn.config import load_config
from gossipdqn.dqn.learner import pick_device
from gossipdqn.node.node import Node

CONFIGS = Path(__file__).resolve().parent / "configs"
CARTPOLE, PONG, MINATAR = (CONFIGS / f"{n}.toml" for n in ("cartpole", "pong", "minatar_breakout"))
FRAMESKIP = 4
"""Atari frames per env step (`gossipdqn.dqn.envs` steps ale-py with frame skip 4)."""


@dataclass(frozen=True)
class Size:
    """How much of each figure to run."""

    cartpole: tuple[str, ...]
    """Overrides of the CartPole run (on top of `configs/cartpole.toml`)."""
    batches: tuple[int, ...]
    seconds: float
    """Length of each timed window."""
    processes: int
    """Actor processes feeding the Pong node."""
    pong: tuple[str, ...]
    """Overrides of the Pong nodes (on top of `configs/pong.toml`)."""
    nodes: int
    gossip: tuple[str, ...]
    """Overrides of the MinAtar gossip runs (on top of `configs/minatar_breakout.toml`)."""
    limit_s: float
    """A gossip run still going after this long is stopped."""


FULL = Size(
    cartpole=("train.stop_at_threshold=true",),
    batches=(32, 256, 512), seconds=5.0, processes=15,
    pong=("replay.capacity=50000", "learner.learning_starts=2000"),
    nodes=8,
    gossip=("train.total_steps=20000", "eval.every_steps=0", "eval.final_episodes=2",
            "checkpoint.every_steps=0"),
    limit_s=150.0,
)  # fmt: skip
TINY = Size(
    cartpole=("train.total_steps=400", "learner.learning_starts=100", "learner.batch_size=16",
              "eval.every_steps=200", "eval.episodes=1", "eval.final_episodes=1",
              "eval.threshold=1", "checkpoint.every_steps=0", "env.num_envs=4",
              "network.hidden=[16,16]", "train.stop_at_threshold=true"),
    batches=(2, 4), seconds=0.1, processes=1,
    pong=("replay.capacity=2000", "learner.learning_starts=64", "learner.batch_size=4",
          "env.num_envs=2"),
    nodes=2,
    gossip=("train.total_steps=200", "learner.learning_starts=100", "eval.every_steps=0",
            "eval.final_episodes=1", "checkpoint.every_steps=0", "env.num_envs=2",
            "replay.capacity=1000", "train.log_every_steps=100", "learner.batch_size=8"),
    limit_s=120.0,
)  # fmt: skip


def sets(overrides: tuple[str, ...] | list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def cartpole(device: str, size: Size, tmp: Path) -> list[dict[str, Any]]:
    """`gossipdqn train` on CartPole, stopping at the threshold; its summary's figures."""
    run_dir = tmp / "cartpole"
    argv = ["train", "--config", str(CARTPOLE), "--device", device, "--run-dir", str(run_dir),
            "--quiet", *sets(size.cartpole)]  # fmt: skip
    code = cli.main(argv)
    summary = json.loads((run_dir / "summary.json").read_text())
    return [{
        "figure": "cartpole_train", "exit_code": code, "threshold": summary["threshold"],
        "reached": summary["steps_to_threshold"] is not None,
        "steps_to_threshold": summary["steps_to_threshold"],
        "seconds_to_threshold": summary["seconds_to_threshold"],
        "final_eval_return_mean": summary["final_eval_return_mean"], "wall_s": summary["wall_s"],
    }]  # fmt: skip


def pong_node(overrides: list[str], run_dir: Path) -> Node:
    return Node(load_config(PONG, overrides), run_dir, quiet=True)


def nature_cnn(device: str, size: Size, tmp: Path) -> list[dict[str, Any]]:
    """Per batch size: a Pong node's sample + update path against the bare loop."""
    rows = []
    for b in size.batches:
        over = [*size.pong, f"learner.batch_size={b}", f'learner.device="{device}"',
                "actor.processes=0", "learner.updates_per_step=0", "env.num_envs=1"]  # fmt: skip
        node = pong_node(over, tmp / f"cnn-{b}")
        try:
            while len(node.replay) < 2 * b:
                node.train_step()
            ours = learner_alone_rate(node, size.seconds)
            bare = bare_rate(node.cfg, node.spec, size.seconds)
        finally:
            node.close()
        rows.append({"figure": "nature_cnn_updates", "batch": b, "learner_updates_per_s": ours,
                     "bare_updates_per_s": bare, "ratio": ours / bare})  # fmt: skip
    return rows


def pong_actors(device: str, size: Size, tmp: Path) -> list[dict[str, Any]]:
    """Pong with actor processes: env frames/s against the raw env, learner with vs alone."""
    p = size.processes
    base = [*size.pong, f'learner.device="{device}"', f"actor.processes={p}"]
    cfg = load_config(PONG, base)
    raw = raw_env_rate(cfg, p, size.seconds) * FRAMESKIP
    node = pong_node([*base, "learner.updates_per_step=0"], tmp / "pong-a")
    try:
        steps, _ = node_rate(node, size.seconds, learning=False)
        alone = learner_alone_rate(node, size.seconds)
    finally:
        node.close()
    node = pong_node([*base, "learner.updates_per_step=8"], tmp / "pong-b")
    try:
        _, with_actors = node_rate(node, size.seconds, learning=True)
    finally:
        node.close()
    frames = steps * FRAMESKIP
    return [
        {"figure": "pong_actor_frames", "processes": p, "num_envs": cfg.env.num_envs,
         "node_frames_per_s": frames, "raw_env_frames_per_s": raw, "ratio": frames / raw},
        {"figure": "pong_learner_with_actors", "processes": p, "batch": cfg.learner.batch_size,
         "updates_per_s_with_actors": with_actors, "updates_per_s_alone": alone,
         "ratio": with_actors / alone},
    ]  # fmt: skip


def local_run(n: int, device: str, size: Size, run_dir: Path) -> list[dict[str, Any]]:
    """`gossipdqn local -n n` on MinAtar Breakout; each node's summary (failed ones raise)."""
    stop = threading.Event()
    timer = threading.Timer(size.limit_s, stop.set)
    timer.start()
    try:
        passthrough = ["--config", str(MINATAR), "--device", device, "--quiet", *sets(size.gossip)]
        code = run_local(n, run_dir, passthrough, stop)
    finally:
        timer.cancel()
    combined = json.loads((run_dir / "summary.json").read_text())
    if code != 0 or stop.is_set():
        raise RuntimeError(f"{n} local nodes: failed {combined['failed']}, stopped {stop.is_set()}")
    return [node["summary"] for node in combined["nodes"]]


def per_node(summaries: list[dict[str, Any]], key: str) -> float:
    """The median node's `key` per second of training."""
    return statistics.median(s[key] / s["wall_s"] for s in summaries)


def gossip_nodes(device: str, size: Size, tmp: Path) -> list[dict[str, Any]]:
    """N gossip nodes sharing the device against one node: per-node env steps/s and updates/s."""
    one = local_run(1, device, size, tmp / "gossip-1")
    many = local_run(size.nodes, device, size, tmp / f"gossip-{size.nodes}")
    row: dict[str, Any] = {"figure": "gossip_nodes_sharing_device", "nodes": size.nodes}
    for key in ("env_steps", "updates"):
        alone, shared = per_node(one, key), per_node(many, key)
        row |= {f"one_node_{key}_per_s": alone, f"per_node_{key}_per_s": shared,
                f"{key}_ratio": shared / alone}  # fmt: skip
    return [row]


FIGURES: dict[str, Callable[[str, Size, Path], list[dict[str, Any]]]] = {
    "cartpole": cartpole, "cnn": nature_cnn, "pong": pong_actors, "gossip": gossip_nodes,
}  # fmt: skip


def machine(device: torch.device) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"figure": "machine", "host": platform.node(), "cores": os.cpu_count(),
            "device": str(device), "gpu": gpu, "torch": torch.__version__}  # fmt: skip


def run_figure(name: str, device: str, size: Size, tmp: Path) -> list[dict[str, Any]]:
    """The figure's lines, each with its seconds; one line with the error if it failed."""
    began = time.perf_counter()
    try:
        rows = FIGURES[name](device, size, tmp)
    except Exception as e:  # one broken figure must not hide the others on a rare GPU
        traceback.print_exc()
        rows = [{"figure": name, "error": f"{type(e).__name__}: {e}"}]
    return [r | {"device": device, "seconds": time.perf_counter() - began} for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--tiny", action="store_true", help="a few steps of everything (CPU, tests)")
    ap.add_argument("--figures", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    ap.add_argument("--out", type=Path, help="also write the lines here (JSON lines)")
    args = ap.parse_args(argv)
    try:
        device = pick_device(args.device)
    except (RuntimeError, ValueError) as e:  # a device torch cannot give
        ap.error(f"--device: {e}")
    size = TINY if args.tiny else FULL
    lines = [machine(device) | {"tiny": args.tiny}]
    print(json.dumps(lines[0]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.figures:
            for row in run_figure(name, str(device), size, Path(tmp)):
                print(json.dumps(row), flush=True)
                lines.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return 1 if any("error" in r for r in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
