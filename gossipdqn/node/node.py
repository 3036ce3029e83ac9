"""The node: wires actors, replay, learner, evaluation, checkpoints and gossip; runs the loop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gossipdqn.config import Config, config_to_toml
from gossipdqn.dqn.actors import Actors
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.evaluate import evaluate
from gossipdqn.dqn.frame_replay import FrameReplay, make_replay
from gossipdqn.dqn.learner import Learner, Prefetcher
from gossipdqn.dqn.networks import fingerprint
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.gossip.protocol import Gossip, ObsBounds
from gossipdqn.net.transport import Transport
from gossipdqn.node.actor_processes import ActorPool, Received
from gossipdqn.node.checkpoint import load_checkpoint, save_checkpoint
from gossipdqn.node.metrics import MetricsLog, PhaseTimer, format_progress, print_progress
from gossipdqn.types import EvalResult, SampledBatch, Transitions, VectorStep

CHECKPOINT_NAME = "checkpoint.pt"


class Exchange(Protocol):
    """How a node trades knowledge with others (gossip, a parameter server, all-reduce)."""

    def attach(self, learner: Learner, replay: ReplayBuffer) -> None:
        """Called once, when the node has built the parts the exchange works on."""

    def after_env_step(self, env_steps: int, transitions: Transitions) -> None:
        """Called after every actor step with the transitions it produced."""

    def after_update(self, updates: int) -> None:
        """Called after every learner update."""

    def metrics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class Progress:
    """Counters of a run, checkpointed and restored on resume."""

    env_steps: int = 0
    updates: int = 0
    episodes: int = 0
    train_s: float = 0.0
    evals: int = 0
    steps_to_threshold: int | None = None
    seconds_to_threshold: float | None = None
    last_eval: float | None = None
    evals_at_threshold: int = 0


@dataclasses.dataclass
class Window:
    """Statistics gathered between two metric records."""

    returns: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    mean_qs: list[float] = dataclasses.field(default_factory=list)
    env_steps: int = 0
    updates: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)


class Node:
    """One DQN node: `train_step()` is one actor step plus the updates it makes due."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        quiet: bool = False,
        label: str = "",
        actor_offset: int = 0,
        total_actors: int | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.quiet, self.label = cfg, Path(run_dir), quiet, label
        if cfg.learner.threads:
            torch.set_num_threads(cfg.learner.threads)
        env = make_vector_env(cfg.env, num_envs=1 if cfg.actor.processes else None)
        self.spec = spec_of(env)
        self.actors = Actors(
            env, self.spec, cfg.actor, n_step=cfg.replay.n_step, gamma=cfg.learner.gamma,
            seed=cfg.seed, actor_offset=actor_offset, total_actors=total_actors,
        )  # fmt: skip
        self.replay = make_replay(cfg.replay, self.spec, gamma=cfg.learner.gamma, seed=cfg.seed + 1)
        self.replay_lock = threading.Lock()
        self.learner = Learner(self.spec, cfg.network, cfg.learner, seed=cfg.seed)
        self.prefetcher: Prefetcher | None = None
        self.pool: ActorPool | None = None
        if cfg.actor.processes:
            self.pool = ActorPool(
                cfg, frames=isinstance(self.replay, FrameReplay), device=self.learner.device,
                policy=self.learner.online,
            )  # fmt: skip
        self.exchange: Exchange | None = None
        self.progress = Progress()
        self.window = Window()
        self.timer = PhaseTimer()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        self.log = MetricsLog(self.run_dir)
        self.last_line = time.monotonic()
        self.recent: dict[str, Any] = {}
        self.last_line_steps = 0

    def connect(self, exchange: Exchange) -> None:
        """Trade knowledge with others through `exchange` from now on."""
        self.exchange = exchange
        exchange.attach(self.learner, self.replay)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def beta(self) -> float:
        frac = min(1.0, self.progress.env_steps / self.cfg.replay.beta_steps)
        return self.cfg.replay.beta_start + frac * (1.0 - self.cfg.replay.beta_start)

    def updates_due(self) -> int:
        lc = self.cfg.learner
        if self.progress.env_steps < lc.learning_starts or len(self.replay) < lc.batch_size:
            return 0
        target = int((self.progress.env_steps - lc.learning_starts) * lc.updates_per_step)
        return max(0, target - self.progress.updates)

    def train_step(self) -> None:
        """Step the actors once, store what they saw, then run the updates now due.

        With actor processes: take in what they sent, or, when updates are due, run them
        instead; the actors block while the learner is behind, which holds the replay ratio.
        """
        if self.pool is not None:
            self._pool_step(self.pool)
            return
        with self.timer.phase("act"):
            out = self.actors.step(self.learner.q_values)
        self._store(0, out.transitions, out.step, out.env_steps, out.episode_returns)
        for _ in range(self.updates_due()):
            self._update()

    def _pool_step(self, pool: ActorPool) -> None:
        with self.timer.phase("actor_check"):
            pool.check()
        due = self.updates_due()
        if due:
            for _ in range(due):
                self._update()
            return
        with self.timer.phase("receive"):
            received: list[Received] = pool.receive(0.05, max_messages=self.cfg.actor.processes)
        for r in received:
            self._store(r.stream, r.transitions, r.step, r.env_steps, r.episode_returns)
        self.actors.steps = self.progress.env_steps

    def _store(
        self, stream: int, transitions: Transitions | None, step: VectorStep | None,
        env_steps: int, episode_returns: np.ndarray,
    ) -> None:  # fmt: skip
        """Add one vector step's experience to replay and count it; tell the exchange."""
        with self.timer.phase("replay_add"), self.replay_lock:
            if isinstance(self.replay, FrameReplay) and step is not None:
                slots = self.replay.add_steps(stream, step)
                if transitions is None and self.exchange is not None:
                    transitions = self.replay.transitions(slots)
            elif transitions is not None:
                self.replay.add(transitions)
        self.progress.env_steps += env_steps
        self.progress.episodes += len(episode_returns)
        self.window.env_steps += env_steps
        self.window.returns.extend(episode_returns.tolist())
        if self.exchange is not None and transitions is not None:
            with self.timer.phase("gossip"):
                self.exchange.after_env_step(self.progress.env_steps, transitions)

    def _sample(self) -> SampledBatch:
        with self.replay_lock:
            return self.replay.sample(self.cfg.learner.batch_size, self.beta())

    def _update(self) -> None:
        with self.timer.phase("sample"):
            if self.cfg.learner.prefetch:
                self.prefetcher = self.prefetcher or Prefetcher(self._sample, self.learner)
                batch = self.prefetcher.next()
            else:
                batch = self._sample()
        with self.timer.phase("update"):
            result = self.learner.step(batch, td_errors=self.replay.prioritized)
        with self.replay_lock:
            self.replay.update_priorities(batch.indices, result.td_errors)
        self.progress.updates += 1
        self.window.updates += 1
        if not math.isnan(result.loss):
            self.window.losses.append(result.loss)
            self.window.mean_qs.append(result.mean_q)
        if self.pool is not None and self.progress.updates % self.cfg.actor.refresh_every == 0:
            with self.timer.phase("publish"):
                self.pool.publish(self.progress.updates, self.progress.env_steps)
        if self.exchange is not None:
            with self.timer.phase("gossip"):
                self.exchange.after_update(self.progress.updates)

    def evaluate(self, episodes: int) -> EvalResult:
        """Greedy evaluation on separate environments, seeded apart from training."""
        seed = self.cfg.seed + 1_000_003 * (self.progress.evals + 1)
        self.progress.evals += 1
        return evaluate(
            self.learner.q_values, self.cfg.env, episodes, seed=seed, eps=self.cfg.eval.eps
        )

    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Train until total_steps, the threshold (when asked to stop there) or `stop`."""
        stop = stop or threading.Event()
        cfg = self.cfg
        next_eval = _next_multiple(self.progress.env_steps, cfg.eval.every_steps)
        next_log = _next_multiple(self.progress.env_steps, cfg.train.log_every_steps)
        next_ckpt = _next_multiple(self.progress.env_steps, cfg.checkpoint.every_steps)
        solved = False
        while self.progress.env_steps < cfg.train.total_steps and not stop.is_set() and not solved:
            started = time.perf_counter()
            self.train_step()
            self.progress.train_s += time.perf_counter() - started
            steps = self.progress.env_steps
            if next_eval and steps >= next_eval:
                next_eval = _next_multiple(steps, cfg.eval.every_steps)
                solved = self._periodic_eval() and cfg.train.stop_at_threshold
            if steps >= next_log:
                next_log = _next_multiple(steps, cfg.train.log_every_steps)
                self._record()
            if next_ckpt and steps >= next_ckpt:
                next_ckpt = _next_multiple(steps, cfg.checkpoint.every_steps)
                self.save()
            self._maybe_progress_line()
        return self.finish(interrupted=stop.is_set())

    def _periodic_eval(self) -> bool:
        result = self.evaluate(self.cfg.eval.episodes)
        self.progress.last_eval = result.mean
        met = result.mean >= self.cfg.eval.threshold
        self.progress.evals_at_threshold = self.progress.evals_at_threshold + 1 if met else 0
        reached = self.progress.evals_at_threshold >= self.cfg.eval.consecutive
        if reached and self.progress.steps_to_threshold is None:
            self.progress.steps_to_threshold = self.progress.env_steps
            self.progress.seconds_to_threshold = self.progress.train_s
        self.log.write({
            "step": self.progress.env_steps, "wall_s": self.progress.train_s,
            "eval_return_mean": result.mean, "eval_return_std": result.std,
        })  # fmt: skip
        return reached

    def _record(self) -> dict[str, Any]:
        w, p = self.window, self.progress
        elapsed = max(time.perf_counter() - w.started, 1e-9)
        record: dict[str, Any] = {"step": p.env_steps, "wall_s": p.train_s}
        record |= {
            "updates": p.updates, "episodes": p.episodes, "replay_size": len(self.replay),
            "return_mean": _mean(w.returns), "loss": _mean(w.losses), "mean_q": _mean(w.mean_qs),
            "epsilon": float(np.mean(self.actors.epsilon())),
            "env_steps_per_s": w.env_steps / elapsed, "updates_per_s": w.updates / elapsed,
        }  # fmt: skip
        record |= self.timer.split()
        if self.exchange is not None:
            record |= self.exchange.metrics()
        self.log.write(record)
        self.recent = record
        self.window = Window()
        return record

    def _maybe_progress_line(self) -> None:
        now = time.monotonic()
        elapsed = now - self.last_line
        if elapsed < self.cfg.train.progress_every_s:
            return
        self.last_line = now
        self.log.flush()
        steps = self.progress.env_steps
        speed = (steps - self.last_line_steps) / elapsed
        self.last_line_steps = steps
        if not self.quiet:
            record = self.recent | {"step": steps, "env_steps_per_s": speed}
            record["eval_return_mean"] = self.progress.last_eval
            if self.exchange is not None:
                record["peers_alive"] = self.exchange.metrics().get("peers_alive")
            print_progress(format_progress(self.label, record))

    def finish(self, *, interrupted: bool) -> dict[str, Any]:
        """Final evaluation (unless interrupted), last checkpoint, `summary.json`."""
        final = None if interrupted else self.evaluate(self.cfg.eval.final_episodes)
        self.save()
        p = self.progress
        summary = {
            "env_steps": p.env_steps, "updates": p.updates, "episodes": p.episodes,
            "wall_s": p.train_s, "interrupted": interrupted,
            "final_eval_return_mean": final.mean if final else None,
            "final_eval_return_std": final.std if final else None,
            "final_eval_returns": list(final.returns) if final else None,
            "threshold": self.cfg.eval.threshold,
            "steps_to_threshold": p.steps_to_threshold,
            "seconds_to_threshold": p.seconds_to_threshold,
            "time_split": self.timer.split(),
        }  # fmt: skip
        if self.exchange is not None:
            summary["exchange"] = self.exchange.metrics()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": 1,
            "config": config_to_toml(self.cfg),
            "progress": dataclasses.asdict(self.progress),
            "learner": self.learner.state_dict(),
            "actor": {"steps": self.actors.steps, "rng": self.actors.rng.bit_generator.state},
            "torch_rng": torch.get_rng_state(),
        }
        if self.cfg.checkpoint.replay:
            state["replay"] = self.replay.state_dict()
        return state

    def save(self) -> None:
        with self.timer.phase("checkpoint"):
            save_checkpoint(self.checkpoint_path, self.state_dict())

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: nets, optimizer, counters, epsilon, RNGs, replay."""
        state = load_checkpoint(path)
        self.learner.load_state_dict(state["learner"])
        self.progress = Progress(**state["progress"])
        self.last_line_steps = self.progress.env_steps
        self.actors.steps = int(state["actor"]["steps"])
        self.actors.rng.bit_generator.state = state["actor"]["rng"]
        torch.set_rng_state(state["torch_rng"])
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        if self.pool is not None:  # actors (and the inference copy) act with the restored net
            self.pool.publish(self.progress.updates, self.progress.env_steps)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.pool is not None:
            self.pool.close()
        if self.exchange is not None:
            self.exchange.close()
        self.actors.close()
        self.log.close()


def _next_multiple(value: int, every: int) -> int:
    """The first multiple of `every` above `value`; 0 when `every` is 0 (disabled)."""
    return (value // every + 1) * every if every else 0


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def default_run_id(name: str, addresses: list[str]) -> str:
    """The run id every node of one run derives alike: its name and peer list, hashed."""
    return hashlib.sha256("|".join([name, *addresses]).encode()).hexdigest()[:12]


def gossip_node(
    cfg: Config,
    run_dir: Path,
    *,
    rank: int,
    addresses: list[str],
    bind_host: str | None = None,
    run_id: str | None = None,
    quiet: bool = False,
) -> Node:
    """A node that gossips with the peers at `addresses` (host:port, in rank order)."""
    world = len(addresses)
    num_envs = cfg.env.num_envs
    node = Node(
        cfg, run_dir, quiet=quiet, label=f"[node {rank}]",
        actor_offset=rank * num_envs, total_actors=world * num_envs,
    )  # fmt: skip
    endpoints = [f"tcp://{a}" for a in addresses]
    host, port = addresses[rank].rsplit(":", 1)
    peers = {r: e for r, e in enumerate(endpoints) if r != rank}
    transport = Transport(
        rank, f"tcp://{bind_host or host}:{port}", peers, cfg.gossip, cfg.security, cfg.faults,
        seed=cfg.seed,
    )  # fmt: skip
    try:
        transport.start()
    except BaseException:
        node.close()
        raise
    space = node.actors.env.single_observation_space
    gossip = Gossip(
        rank, endpoints, transport, cfg.gossip,
        run_id=run_id or default_run_id(cfg.name, addresses), spec=node.spec,
        fingerprint=fingerprint(node.learner.online),
        bounds=ObsBounds(np.asarray(space.low), np.asarray(space.high)), seed=cfg.seed,
    )  # fmt: skip
    node.connect(gossip)
    return node
