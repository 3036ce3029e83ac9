"""Throughput of a node, as ratios measured in one run on this machine (issue 7).

1. env steps/s of a node with A actor processes (learner only ingesting) vs A processes that
   step the raw vector env with random actions, on the same cores (target >= 0.85);
2. learner updates/s (replay sampling included) vs a bare PyTorch loop of the same network,
   batch and device on batches already there (target >= 0.9);
3. learner updates/s while A actor processes stream vs the learner alone (target >= 0.8).

    python experiments/bench_throughput.py --env MinAtar/Breakout-v1 --processes 1 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gossipdqn.config import Config, load_config
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.learner import Learner
from gossipdqn.dqn.networks import build_q_network
from gossipdqn.node.node import Node


def _raw_worker(cfg: Config, seconds: float, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    env = make_vector_env(cfg.env)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    n, steps, start = cfg.env.num_envs, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.step(rng.integers(0, env.single_action_space.n, n))
        steps += n
    out.put(steps / (time.perf_counter() - start))
    env.close()


def raw_env_rate(cfg: Config, processes: int, seconds: float) -> float:
    """Env steps/s of `processes` processes stepping the raw vector env with random actions."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_raw_worker, args=(cfg, seconds, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    return float(sum(rates))


def node_rate(node: Node, seconds: float, *, learning: bool) -> tuple[float, float]:
    """(env steps/s, updates/s) of a node's train_step loop once data (and updates) flow."""
    deadline = time.perf_counter() + 300.0
    while time.perf_counter() < deadline and (
        node.progress.updates < 10 if learning else node.progress.env_steps < 1000
    ):
        node.train_step()
    steps, updates = node.progress.env_steps, node.progress.updates
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        node.train_step()
    elapsed = time.perf_counter() - start
    return (node.progress.env_steps - steps) / elapsed, (node.progress.updates - updates) / elapsed


def learner_alone_rate(node: Node, seconds: float) -> float:
    """Updates/s of the node's sample + learner step path, with no actors stepping."""
    for _ in range(5):
        node._update()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        node._update()
        count += 1
    return count / (time.perf_counter() - start)


def bare_rate(cfg: Config, spec, seconds: float) -> float:
    """Updates/s of a plain Double DQN loop on random batches already on the device."""
    learner = Learner(spec, cfg.network, cfg.learner, seed=0)
    device, b = learner.device, cfg.learner.batch_size
    online, target = build_q_network(spec, cfg.network).to(device), learner.target
    opt = torch.optim.Adam(online.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    obs = torch.from_numpy(rng.integers(0, 2, (b, *spec.obs_shape)).astype(spec.obs_dtype))
    obs = obs.to(device)
    actions = torch.randint(0, spec.n_actions, (b,), device=device)
    rewards, discounts = torch.rand(b, device=device), torch.full((b,), 0.97, device=device)

    def one() -> None:
        with torch.no_grad():
            best = online(obs).argmax(1, keepdim=True)
            y = rewards + discounts * target(obs).gather(1, best).squeeze(1)
        q = online(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.huber_loss(q, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(online.parameters(), 10.0)
        opt.step()

    for _ in range(5):
        one()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one()
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--env", default="MinAtar/Breakout-v1")
    ap.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value")
    ap.add_argument("--out", default="experiments/results/bench_throughput.json")
    args = ap.parse_args()
    base = [f"env.id={args.env}", f"env.num_envs={args.num_envs}",
            f"learner.batch_size={args.batch}", "replay.capacity=50000",
            "learner.learning_starts=2000", *args.set]  # fmt: skip
    cfg = load_config(None, base)
    env = make_vector_env(cfg.env, 1)
    spec = spec_of(env)
    env.close()
    learner_device = Learner(spec, cfg.network, cfg.learner, seed=0).device
    results: dict = {
        "env": args.env, "processes": args.processes, "num_envs": args.num_envs,
        "batch": args.batch, "machine": f"{platform.node()} {os.cpu_count()} cores",
        "device": str(learner_device),
    }  # fmt: skip
    results["raw_env_steps_per_s"] = raw_env_rate(cfg, args.processes, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        over = base + [f"actor.processes={args.processes}", "learner.updates_per_step=0"]
        node = Node(load_config(None, over), Path(tmp) / "a", quiet=True)
        try:
            results["node_env_steps_per_s"], _ = node_rate(node, args.seconds, learning=False)
            results["learner_alone_updates_per_s"] = learner_alone_rate(node, args.seconds)
        finally:
            node.close()
        over = base + [f"actor.processes={args.processes}", "learner.updates_per_step=8"]
        node = Node(load_config(None, over), Path(tmp) / "b", quiet=True)
        try:
            _, results["learner_with_actors_updates_per_s"] = node_rate(
                node, args.seconds, learning=True
            )
        finally:
            node.close()
    results["bare_updates_per_s"] = bare_rate(cfg, spec, args.seconds)
    results["ratio_env"] = results["node_env_steps_per_s"] / results["raw_env_steps_per_s"]
    results["ratio_learner"] = (
        results["learner_alone_updates_per_s"] / results["bare_updates_per_s"]
    )
    results["ratio_concurrent"] = (
        results["learner_with_actors_updates_per_s"] / results["learner_alone_updates_per_s"]
    )
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
