"""The node: wires actors, replay, learner, evaluation, checkpoints and gossip; runs the loop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossipdqn.config import Config, EvalConfig, ReplayConfig, config_to_toml
from gossipdqn.dqn.actors import Actors
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.evaluate import evaluate
from gossipdqn.dqn.frame_replay import make_replay
from gossipdqn.dqn.learner import Learner, Prefetcher, UpdateSchedule
from gossipdqn.exchange import Exchange
from gossipdqn.node.actor_processes import ActorPool, Received
from gossipdqn.node.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gossipdqn.node.metrics import (
    LineClock,
    MetricsLog,
    PhaseTimer,
    format_progress,
    print_progress,
)
from gossipdqn.types import EvalResult, SampledBatch, Transitions, VectorStep


@dataclasses.dataclass
class Progress:
    """Counters of a run, checkpointed and restored on resume."""

    env_steps: int = 0
    updates: int = 0
    episodes: int = 0
    train_s: float = 0.0
    cpu_s: float = 0.0
    evals: int = 0
    steps_to_threshold: int | None = None
    seconds_to_threshold: float | None = None
    cpu_seconds_to_threshold: float | None = None
    last_eval: float | None = None
    evals_at_threshold: int = 0

    def beta(self, cfg: ReplayConfig) -> float:
        """The importance-sampling exponent, annealed from beta_start to 1 over beta_steps."""
        frac = min(1.0, self.env_steps / cfg.beta_steps)
        return cfg.beta_start + frac * (1.0 - cfg.beta_start)

    def count_eval(self, mean: float, cfg: EvalConfig) -> bool:
        """Record a periodic evaluation; whether the threshold is now met `consecutive` times."""
        self.last_eval = mean
        self.evals_at_threshold = self.evals_at_threshold + 1 if mean >= cfg.threshold else 0
        reached = self.evals_at_threshold >= cfg.consecutive
        if reached and self.steps_to_threshold is None:
            self.steps_to_threshold, self.seconds_to_threshold = self.env_steps, self.train_s
            self.cpu_seconds_to_threshold = self.cpu_s
        return reached

    def summary(self, final: EvalResult | None, *, interrupted: bool) -> dict[str, Any]:
        """The counters and the final evaluation, as `summary.json` holds them."""
        return {
            "env_steps": self.env_steps, "updates": self.updates, "episodes": self.episodes,
            "wall_s": self.train_s, "cpu_s": self.cpu_s, "interrupted": interrupted,
            "final_eval_return_mean": final.mean if final else None,
            "final_eval_return_std": final.std if final else None,
            "final_eval_returns": list(final.returns) if final else None,
            "steps_to_threshold": self.steps_to_threshold,
            "seconds_to_threshold": self.seconds_to_threshold,
            "cpu_seconds_to_threshold": self.cpu_seconds_to_threshold,
        }  # fmt: skip


@dataclasses.dataclass
class Window:
    """Statistics gathered between two metric records."""

    returns: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    mean_qs: list[float] = dataclasses.field(default_factory=list)
    env_steps: int = 0
    updates: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def record(self) -> dict[str, Any]:
        """Means and rates over the window."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "return_mean": _mean(self.returns), "loss": _mean(self.losses),
            "mean_q": _mean(self.mean_qs), "env_steps_per_s": self.env_steps / elapsed,
            "updates_per_s": self.updates / elapsed,
        }  # fmt: skip


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
        self.learner = Learner(self.spec, cfg.network, cfg.learner, seed=cfg.seed)
        self.schedule = UpdateSchedule(cfg.learner.learning_starts, cfg.learner.updates_per_step)
        self.prefetcher: Prefetcher | None = None
        self.pool: ActorPool | None = ActorPool(
            cfg, frames=self.replay.stores_frames, device=self.learner.device,
            policy=self.learner.online, actor_offset=actor_offset, total_actors=total_actors,
        ) if cfg.actor.processes else None  # fmt: skip
        self.exchange: Exchange | None = None
        self.progress = Progress()
        self.window = Window()
        self.timer = PhaseTimer()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        self.log = MetricsLog(self.run_dir)
        self.line = LineClock(cfg.train.progress_every_s)
        self.recent: dict[str, Any] = {}

    def connect(self, exchange: Exchange) -> None:
        """Trade knowledge with others through `exchange` from now on."""
        self.exchange = exchange
        exchange.attach(self.learner, self.replay)

    def updates_due(self) -> int:
        enough = len(self.replay) >= self.cfg.learner.batch_size
        return self.schedule.due(self.progress.env_steps, self.progress.updates) if enough else 0

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
        self.actors.steps = self.progress.env_steps  # the epsilon state a checkpoint keeps

    def _store(
        self, stream: int, transitions: Transitions | None, step: VectorStep | None,
        env_steps: int, episode_returns: np.ndarray,
    ) -> None:  # fmt: skip
        """Add one vector step's experience to replay and count it; tell the exchange."""
        with self.timer.phase("replay_add"), self.replay.lock:  # the slots read back are ours
            slots = self.replay.add_step(stream, transitions, step)
            if transitions is None and self.exchange is not None:
                transitions = self.replay.transitions(slots)
        self.progress.env_steps += env_steps
        self.progress.episodes += len(episode_returns)
        self.window.env_steps += env_steps
        self.window.returns.extend(episode_returns.tolist())
        if self.exchange is not None and transitions is not None:
            with self.timer.phase("gossip"):
                self.exchange.after_env_step(self.progress.env_steps, transitions)

    def _sample(self) -> SampledBatch:
        beta = self.progress.beta(self.cfg.replay)
        return self.replay.sample(self.cfg.learner.batch_size, beta)

    def _update(self) -> None:
        with self.timer.phase("sample"):
            if self.cfg.learner.prefetch:
                self.prefetcher = self.prefetcher or Prefetcher(self._sample, self.learner)
                batch = self.prefetcher.next()
            else:
                batch = self._sample()
        with self.timer.phase("update"):
            self.learner.follow_lr_schedule(self.progress.env_steps)
            result = self.learner.step(batch, td_errors=self.replay.prioritized)
        self.replay.update_priorities(batch.indices, result.td_errors, batch.sampled_at)
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
        self.progress.evals += 1
        seed, eps = self.cfg.seed + 1_000_003 * self.progress.evals, self.cfg.eval.eps
        self.learner.sync_actor_net()  # whatever changed the online net last, evaluate it
        return evaluate(self.learner.q_values, self.cfg.env, episodes, seed=seed, eps=eps)

    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Train until total_steps, the threshold (when asked to stop there) or `stop`."""
        stop, cfg = stop or threading.Event(), self.cfg
        next_eval = _next_multiple(self.progress.env_steps, cfg.eval.every_steps)
        next_log = _next_multiple(self.progress.env_steps, cfg.train.log_every_steps)
        next_ckpt = _next_multiple(self.progress.env_steps, cfg.checkpoint.every_steps)
        solved = False
        if self.exchange is not None:
            self.exchange.rendezvous(stop)
        while self.progress.env_steps < cfg.train.total_steps and not stop.is_set() and not solved:
            started, started_cpu = time.perf_counter(), time.process_time()
            self.train_step()
            self.progress.train_s += time.perf_counter() - started
            self.progress.cpu_s += time.process_time() - started_cpu
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
        self._maybe_progress_line(last=True)
        return self.finish(interrupted=stop.is_set())

    def _periodic_eval(self) -> bool:
        result = self.evaluate(self.cfg.eval.episodes)
        reached = self.progress.count_eval(result.mean, self.cfg.eval)
        self.log.write({
            "step": self.progress.env_steps, "wall_s": self.progress.train_s,
            "eval_return_mean": result.mean, "eval_return_std": result.std,
        })  # fmt: skip
        return reached

    def _record(self) -> dict[str, Any]:
        p = self.progress
        record: dict[str, Any] = {"step": p.env_steps, "wall_s": p.train_s}
        record |= {"updates": p.updates, "episodes": p.episodes, "replay_size": len(self.replay)}
        record |= self.window.record() | {"epsilon": acting_epsilon(self.actors, self.pool)}
        record["lr"] = self.learner.optimizer.param_groups[0]["lr"]
        record |= self.timer.split()
        if self.exchange is not None:
            record |= self.exchange.metrics()
        self.log.write(record)
        self.recent = record
        self.window = Window()
        return record

    def _maybe_progress_line(self, *, last: bool = False) -> None:
        steps = self.progress.env_steps
        speed = self.line.speed_if_due(steps, last=last)
        if speed is None:
            return
        self.log.flush()
        if not self.quiet:
            record = self.recent | {"step": steps, "env_steps_per_s": speed}
            record["eval_return_mean"] = self.progress.last_eval
            if self.exchange is not None:
                live = self.exchange.metrics()
                record |= {k: live.get(k) for k in PROGRESS_EXCHANGE_KEYS}
            print_progress(format_progress(self.label, record))

    def finish(self, *, interrupted: bool) -> dict[str, Any]:
        """Final evaluation (unless interrupted), last checkpoint, `summary.json`."""
        final = None if interrupted else self.evaluate(self.cfg.eval.final_episodes)
        self.save()
        summary = self.progress.summary(final, interrupted=interrupted)
        summary |= {"threshold": self.cfg.eval.threshold, "time_split": self.timer.split()}
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
            "exchange": self.exchange.state_dict() if self.exchange is not None else {},
        }
        if self.cfg.checkpoint.replay:
            state["replay"] = self.replay.state_dict()
        return state

    def save(self) -> None:
        with self.timer.phase("checkpoint"):
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.state_dict())

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: nets, optimizer, counters, epsilon, RNGs, replay."""
        state = load_checkpoint(path)
        self.learner.load_state_dict(state["learner"])
        self.progress = Progress(**state["progress"])
        self.line.steps = self.progress.env_steps
        self.actors.steps = int(state["actor"]["steps"])
        self.actors.rng.bit_generator.state = state["actor"]["rng"]
        torch.set_rng_state(state["torch_rng"])
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        else:  # an empty replay: collect learning_starts steps again, then the same ratio
            self.schedule = self.schedule.restarted(self.progress.env_steps, self.progress.updates)
        if self.exchange is not None and state.get("exchange"):
            self.exchange.load_state_dict(state["exchange"])
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


PROGRESS_EXCHANGE_KEYS = ("peers_alive", "params_mixed_per_s", "mixing_stalled", "insecure")
"""What the progress line shows of an exchange's metrics (those it reports)."""


def _next_multiple(value: int, every: int) -> int:
    """The first multiple of `every` above `value`; 0 when `every` is 0 (disabled)."""
    return (value // every + 1) * every if every else 0


def acting_epsilon(actors: Actors, pool: ActorPool | None) -> float | None:
    """The mean exploration rate the node's actors act with (its actor processes' when any)."""
    return pool.epsilon() if pool is not None else float(np.mean(actors.epsilon()))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def default_run_id(name: str, addresses: list[str]) -> str:
    """The run id every node of one run derives alike: its name and peer list, hashed."""
    return hashlib.sha256("|".join([name, *addresses]).encode()).hexdigest()[:12]


def node_of_rank(
    cfg: Config, run_dir: Path, rank: int, world: int, *,
    resumed: bool = False, quiet: bool = False, label: str | None = None,
) -> Node:  # fmt: skip
    """Node `rank` of a run of `world` nodes: its seed is the run's plus `rank` (a resumed
    node's saved config has it already), its actors are `rank * E ..` of `world * E` in all
    (E: env.num_envs, times actor.processes when there are any)."""
    if not resumed:
        cfg = dataclasses.replace(cfg, seed=cfg.seed + rank)
    envs = cfg.env.num_envs * max(1, cfg.actor.processes)
    return Node(
        cfg, run_dir, quiet=quiet, label=f"[node {rank}]" if label is None else label,
        actor_offset=rank * envs, total_actors=world * envs,
    )  # fmt: skip
