"""The `baseline` command: start a baseline's processes here, watch them, write the summaries.

Run-dir layout, as for gossip runs: `DIR/node-<i>/` per worker (config.toml, metrics.jsonl,
summary.json, checkpoint.pt) and `DIR/summary.json` combined; a parameter-server run also has
`DIR/server/summary.json` (gradients applied, bytes in and out).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gossipdqn.baselines import ExchangeLost
from gossipdqn.baselines.allreduce import AllReduceExchange
from gossipdqn.baselines.ps import Link, ServerExchange, ps_transport, run_server
from gossipdqn.cluster import procs
from gossipdqn.cluster.local import combined_summary, free_ports
from gossipdqn.config import Config
from gossipdqn.node.node import Node, default_run_id, node_of_rank

LOST_EXIT = 3
"""Exit code of a worker that lost its server or its all-reduce group."""
ROLES = ("ps-server", "ps-worker", "allreduce")


def scale_actors(cfg: Config, n: int) -> Config:
    """One node with `n` times the actors and every env-step count scaled alike (fair budgets)."""
    r = dataclasses.replace
    return r(
        cfg,
        env=r(cfg.env, num_envs=cfg.env.num_envs * n),
        actor=r(cfg.actor, eps_decay_steps=cfg.actor.eps_decay_steps * n),
        replay=r(cfg.replay, capacity=cfg.replay.capacity * n,
                 beta_steps=cfg.replay.beta_steps * n),
        learner=r(cfg.learner, learning_starts=cfg.learner.learning_starts * n,
                  lr_decay_steps=cfg.learner.lr_decay_steps * n),
        train=r(cfg.train, total_steps=cfg.train.total_steps * n,
                log_every_steps=cfg.train.log_every_steps * n),
        eval=r(cfg.eval, every_steps=cfg.eval.every_steps * n),
        checkpoint=r(cfg.checkpoint, every_steps=cfg.checkpoint.every_steps * n),
        gossip=r(cfg.gossip, share_every=cfg.gossip.share_every * n),
    )  # fmt: skip


def worker_command(
    role: str, rank: int, addresses: list[str], out: Path, passthrough: list[str], *extra: str
) -> list[str]:
    """The command line of one baseline process, writing into `out`."""
    return [
        sys.executable, "-m", "gossipdqn", "baseline-worker", "--role", role, "--rank", str(rank),
        "--peers", ",".join(addresses), "--run-dir", str(out), *extra, *passthrough,
    ]  # fmt: skip


def ps_commands(n: int, run_dir: Path, passthrough: list[str], pull_every: int) -> list[list[str]]:
    """The server (first) and `n` workers; worker rank r writes `node-<r-1>`."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(n + 1)]
    pull = ("--pull-every", str(pull_every))
    server = worker_command("ps-server", 0, addresses, run_dir / "server", passthrough, *pull)
    workers = [
        worker_command("ps-worker", r, addresses, run_dir / f"node-{r - 1}", passthrough, *pull)
        for r in range(1, n + 1)
    ]
    return [server, *workers]


def allreduce_commands(n: int, run_dir: Path, passthrough: list[str]) -> list[list[str]]:
    """`n` workers; rank 0's address hosts the torch.distributed store."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(n)]
    return [
        worker_command("allreduce", r, addresses, run_dir / f"node-{r}", passthrough)
        for r in range(n)
    ]


@dataclasses.dataclass(frozen=True)
class Kill:
    """SIGKILL process `victim` once `watch` (a metrics.jsonl) logs a step of at least `at_step`."""

    victim: int
    watch: Path
    at_step: int


def last_step(metrics: Path) -> int:
    """The step of the last record in a metrics.jsonl (0 when there is none yet)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def run_group(
    commands: list[list[str]], stop: threading.Event, *, workers: slice, kill: Kill | None = None
) -> tuple[list[int], dict[str, Any] | None]:
    """Run the processes until the `workers` among them exit (or `stop`); exit codes, kill."""
    group = [child.proc for child in procs.start_group(commands)]
    killed: dict[str, Any] = {}

    def inject() -> None:
        if kill is not None and not killed and last_step(kill.watch) >= kill.at_step:
            group[kill.victim].kill()
            killed.update(victim=kill.victim, at_step=last_step(kill.watch), at_s=time.time())

    try:
        procs.watch(group[workers], stop, on_poll=inject, poll_s=0.5)
    finally:
        procs.stop(group)
    return [p.returncode for p in group], killed or None


def write_summary(
    run_dir: Path, mode: str, codes: list[int], extra: dict[str, Any]
) -> dict[str, Any]:
    """`DIR/summary.json`: the combined node summaries plus the mode and what else is given."""
    summary = combined_summary(run_dir, codes) | {"mode": mode, "workers": len(codes)} | extra
    server = run_dir / "server" / "summary.json"
    if server.is_file():
        summary["server"] = json.loads(server.read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_node(node: Node, exchange: Any, stop: threading.Event) -> int:
    """Connect, run until done or stopped, close; LOST_EXIT when the exchange lost its peers."""
    try:
        node.connect(exchange)
        node.run(stop)
    except ExchangeLost as e:
        print(f"gossipdqn baseline-worker: error: {e}", file=sys.stderr, flush=True)
        return LOST_EXIT
    finally:
        node.close()
    if exchange.lost:
        print(f"gossipdqn baseline-worker: error: {exchange.lost}", file=sys.stderr, flush=True)
        return LOST_EXIT
    return 0


def run_worker(
    role: str, cfg: Config, run_dir: Path, rank: int, peers: list[str], *,
    stop: threading.Event, bind: str | None = None, quiet: bool = False, pull_every: int = 1,
) -> int:  # fmt: skip
    """One process of a baseline: the PS server, a PS worker or an all-reduce worker."""
    run_id = default_run_id(cfg.name, peers)
    if role == "ps-server":
        link = Link(rank, run_id, ps_transport(cfg, rank, peers, bind), cfg.gossip)
        try:
            run_server(cfg, run_dir, link, stop, pull_every)
        finally:
            link.transport.close()
        return 0
    first = 1 if role == "ps-worker" else 0  # the server is rank 0 of a ps run's peers
    node = node_of_rank(
        cfg, run_dir, rank - first, len(peers) - first, quiet=quiet, label=f"[{role} {rank}]"
    )
    if role == "ps-worker":
        try:
            link = Link(rank, run_id, ps_transport(node.cfg, rank, peers, bind), cfg.gossip)
        except BaseException:
            node.close()
            raise
        return _run_node(node, ServerExchange(link, stop, pull_every=pull_every), stop)
    timeout_s = max(60.0, 6 * cfg.gossip.peer_timeout_s)
    exchange = AllReduceExchange(rank, len(peers), peers[0], stop, timeout_s=timeout_s)
    return _run_node(node, exchange, stop)
