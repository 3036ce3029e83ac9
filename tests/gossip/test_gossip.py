"""Gossip between real nodes: loopback TCP, real processes, hard timeouts, all cleaned up."""

import json
import signal
import subprocess

import numpy as np
import torch

from gossipdqn.cluster.local import free_ports, node_command
from gossipdqn.cluster.procs import stop as stop_processes
from gossipdqn.config import load_config
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.learner import Learner
from gossipdqn.gossip.mixing import flatten
from gossipdqn.gossip.nodes import gossip_node
from gossipdqn.node.checkpoint import load_checkpoint


def build_nodes(tmp_path, n, overrides):
    addresses = [f"127.0.0.1:{p}" for p in free_ports(n)]
    cfg = load_config(None, overrides)
    nodes = []
    try:
        for rank in range(n):
            nodes.append(gossip_node(
                cfg, tmp_path / f"node-{rank}", rank=rank, addresses=addresses, quiet=True
            ))  # fmt: skip
    except BaseException:
        for node in nodes:
            node.close()
        raise
    return nodes


def step_until(nodes, condition, max_steps=2000):
    for _ in range(max_steps):
        for node in nodes:
            node.train_step()
        if condition():
            return True
        nodes[0].exchange.transport.wait(0.01)
    return False


def test_experience_sent_by_a_is_found_in_b_replay(tmp_path):
    overrides = ["gossip.params=false", "gossip.share_every=64", "gossip.share_batch=16",
                 "learner.learning_starts=100000", "env.num_envs=4"]  # fmt: skip
    a, b = build_nodes(tmp_path, 2, overrides)
    try:
        got = lambda: b.exchange.counts.received["experience"] > 0  # noqa: E731
        assert step_until([a, b], got), "no experience arrived within the step budget"
        a_obs = a.replay.obs[: len(a.replay)]
        b_obs = b.replay.obs[: len(b.replay)]
        found = (b_obs[:, None, :] == a_obs[None, :, :]).all(axis=2).any(axis=1)
        assert found.sum() >= 16  # A's batch sits in B's replay beside B's own transitions
        assert b.exchange.metrics()["gossip_recv_experience"] >= 1
    finally:
        a.close()
        b.close()


def test_a_node_shares_only_its_own_experience_never_a_peers_back(tmp_path):
    # prioritized replay, no updates: what a peer sent sits at the highest priority, beside the
    # node's own; shares must still carry the node's own transitions only, each once
    overrides = ["gossip.params=false", "gossip.share_every=64", "gossip.share_batch=64",
                 "replay.prioritized=true", "learner.learning_starts=100000", "env.num_envs=4"]
    a, b = build_nodes(tmp_path, 2, overrides)
    try:
        both = lambda: min(n.exchange.counts.received["experience"] for n in (a, b)) >= 2  # noqa: E731
        assert step_until([a, b], both), "no experience both ways within the step budget"
        for node in (a, b):
            obs = node.replay.obs[: len(node.replay)]
            _, counts = np.unique(obs, axis=0, return_counts=True)
            assert counts.max() == 1, f"{(counts > 1).sum()} transitions came back to their sender"
    finally:
        a.close()
        b.close()


def test_parameters_mix_in_process(tmp_path):
    overrides = ["gossip.experience=false", "gossip.interval=1", "learner.lr=0",
                 "learner.learning_starts=64", "learner.batch_size=16", "env.num_envs=4",
                 "learner.updates_per_step=1", "gossip.topology=complete"]  # fmt: skip
    nodes = build_nodes(tmp_path, 3, overrides)
    try:
        initial = torch.stack([flatten(list(n.learner.online.parameters())) for n in nodes])
        mean = initial.mean(0)
        spread = (initial - mean).norm(dim=1).max()
        close = lambda: all(  # noqa: E731
            (flatten(list(n.learner.online.parameters())) - mean).norm() < 1e-3 * spread
            for n in nodes
        )
        assert step_until(nodes, close, max_steps=3000)
    finally:
        for node in nodes:
            node.close()


def initial_params(cfg, rank):
    env = make_vector_env(cfg.env, num_envs=1)
    spec = spec_of(env)
    env.close()
    learner = Learner(spec, cfg.network, cfg.learner, seed=cfg.seed + rank)
    return flatten(list(learner.online.parameters()))


def final_params(run_dir):
    state = load_checkpoint(run_dir / "checkpoint.pt")
    return torch.cat([t.reshape(-1) for t in state["learner"]["online"].values()])


def start(tmp_path, n, sets):
    addresses = [f"127.0.0.1:{p}" for p in free_ports(n)]
    passthrough = [a for s in sets for a in ("--set", s)]
    cmds = [node_command(r, addresses, tmp_path, passthrough, resume=False) for r in range(n)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]  # fmt: skip
    return cmds, procs


def test_three_processes_with_lr_zero_converge_to_initial_mean(tmp_path):
    sets = ["learner.lr=0", "gossip.interval=1", "gossip.experience=false",
            "train.total_steps=2500", "learner.learning_starts=100", "learner.batch_size=32",
            "learner.updates_per_step=0.25", "network.hidden=[16,16]", "eval.every_steps=0",
            "gossip.topology=ring", "train.progress_every_s=0.5"]  # fmt: skip
    cmds, procs = start(tmp_path, 3, sets + ["--quiet"][:0])
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-2000:]
    finally:
        stop_processes(procs, grace_s=5)
    cfg = load_config(None, sets)
    mean = torch.stack([initial_params(cfg, r) for r in range(3)]).mean(0)
    spread = max((initial_params(cfg, r) - mean).norm() for r in range(3))
    for rank in range(3):
        final = final_params(tmp_path / f"node-{rank}")
        assert (final - mean).norm() < 0.05 * spread, f"node {rank} did not reach the mean"
        summary = json.loads((tmp_path / f"node-{rank}" / "summary.json").read_text())
        assert summary["exchange"]["gossip_recv_params"] > 100


def read_peers(proc, want, max_lines=400):
    """Read node progress lines until one reports `want` peers alive."""
    for _ in range(max_lines):
        line = proc.stdout.readline()
        assert line, "node exited"
        if f"peers {want}" in line:
            return line
    raise AssertionError(f"no progress line with peers {want}")


def test_killed_node_is_marked_dead_and_rejoins(tmp_path):
    sets = ["train.total_steps=100000000", "train.progress_every_s=0.25",
            "gossip.peer_timeout_s=2", "gossip.heartbeat_s=0.25", "eval.every_steps=0",
            "checkpoint.every_steps=0", "network.hidden=[16,16]"]  # fmt: skip
    cmds, procs = start(tmp_path, 3, sets)
    try:
        read_peers(procs[0], 2)
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait(timeout=10)
        read_peers(procs[0], 1)
        read_peers(procs[1], 1)
        procs[2] = subprocess.Popen(cmds[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)  # fmt: skip
        read_peers(procs[0], 2)
        read_peers(procs[2], 2)
    finally:
        stop_processes(procs, grace_s=10)
    assert [p.returncode for p in procs[:2]] == [0, 0]


def test_a_node_started_first_waits_for_its_peer_and_both_gossip(tmp_path):
    # node 0 alone first: it must wait for node 1 rather than train its short run alone (under
    # Slurm one task can finish before the other has started, and neither gossips)
    sets = ["train.total_steps=1500", "learner.learning_starts=100", "learner.batch_size=16",
            "network.hidden=[16,16]", "eval.every_steps=0", "eval.final_episodes=1",
            "checkpoint.every_steps=0", "gossip.interval=4", "gossip.share_every=64",
            "gossip.share_batch=16", "gossip.heartbeat_s=0.2"]  # fmt: skip
    addresses = [f"127.0.0.1:{p}" for p in free_ports(2)]
    passthrough = [a for s in sets for a in ("--set", s)] + ["--quiet"]
    cmds = [node_command(r, addresses, tmp_path, passthrough, resume=False) for r in (0, 1)]
    procs = [subprocess.Popen(cmds[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)]  # fmt: skip
    try:
        seen = []
        while (line := procs[0].stdout.readline()) and "waits" not in line:
            seen.append(line)  # node 0 says it waits, or ends having trained alone (EOF)
        procs.append(subprocess.Popen(cmds[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, "".join(seen) + out[-2000:]
    finally:
        stop_processes(procs, grace_s=5)
    for rank in (0, 1):
        summary = json.loads((tmp_path / f"node-{rank}" / "summary.json").read_text())
        assert summary["exchange"]["gossip_recv_params"] > 0, f"node {rank} heard no parameters"
