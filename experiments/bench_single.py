"""Single-node benchmark: gossipdqn vs Stable-Baselines3 DQN on CartPole-v1, side by side.

Both run on this machine with the same torch thread count, seed by seed, alternating, under one
protocol: every 2,000 env steps a greedy evaluation of 10 episodes on separate environments,
the threshold (475) met when 2 evaluations in a row reach it (`eval.consecutive`, the same rule
for both), seconds counting training only, the run stopping there, then a final 20-episode greedy
evaluation.
SB3 uses RL-Zoo's tuned CartPole-v1 hyperparameters. Also measured in the same run: the actor
loop vs the raw vector env with random actions, and the learner vs a bare PyTorch loop.

    pip install -e ".[bench]"
    python experiments/bench_single.py --seeds 5 --json experiments/results/bench_single.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gossipdqn.config import Config, EnvConfig, load_config
from gossipdqn.dqn.actors import Actors
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.evaluate import evaluate
from gossipdqn.dqn.learner import Learner
from gossipdqn.dqn.losses import td_loss, td_targets
from gossipdqn.dqn.networks import build_q_network
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.node.node import Node
from gossipdqn.types import Transitions

CONFIG = Path(__file__).parent / "configs" / "cartpole.toml"
EVAL_EVERY, EVAL_EPISODES, FINAL_EPISODES, THRESHOLD = 2_000, 10, 20, 475.0
CONSECUTIVE = load_config(CONFIG).eval.consecutive


def run_gossipdqn(seed: int, budget: int) -> dict:
    """One single-node run under the protocol; its summary."""
    overrides = [f"seed={seed}", f"train.total_steps={budget}", "train.stop_at_threshold=true"]
    cfg = load_config(CONFIG, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(cfg, Path(tmp), quiet=True)
        try:
            summary = node.run()
        finally:
            node.close()
    return {
        "steps_to_threshold": summary["steps_to_threshold"],
        "seconds_to_threshold": summary["seconds_to_threshold"],
        "final_eval": summary["final_eval_return_mean"],
        "train_s": summary["wall_s"],
    }


def run_sb3(seed: int, budget: int) -> dict:
    """SB3 DQN with RL-Zoo's CartPole-v1 settings, evaluated through a callback."""
    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    env_cfg = EnvConfig(id="CartPole-v1")

    class Protocol(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.eval_s, self.start, self.result = 0.0, time.perf_counter(), {}
            self.evals, self.in_a_row = 0, 0

        def q_values(self, obs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return self.model.q_net(torch.as_tensor(obs, dtype=torch.float32)).numpy()

        def _on_step(self) -> bool:
            if self.num_timesteps % EVAL_EVERY:
                return True
            began = time.perf_counter()
            self.evals += 1
            mean = evaluate(
                self.q_values, env_cfg, EVAL_EPISODES, seed=seed + 7919 * self.evals
            ).mean
            self.eval_s += time.perf_counter() - began
            self.in_a_row = self.in_a_row + 1 if mean >= THRESHOLD else 0
            if self.in_a_row >= CONSECUTIVE:
                self.result = {
                    "steps_to_threshold": self.num_timesteps,
                    "seconds_to_threshold": began - self.start - self.eval_s,
                }
                return False
            return True

    model = DQN(
        "MlpPolicy", gym.make("CartPole-v1"), learning_rate=2.3e-3, batch_size=64,
        buffer_size=100_000, learning_starts=1_000, gamma=0.99, target_update_interval=10,
        train_freq=256, gradient_steps=128, exploration_fraction=0.16,
        exploration_final_eps=0.04, policy_kwargs={"net_arch": [256, 256]}, seed=seed,
        device="cpu", verbose=0,
    )  # fmt: skip
    protocol = Protocol()
    model.learn(total_timesteps=budget, callback=protocol)
    train_s = time.perf_counter() - protocol.start - protocol.eval_s
    final = evaluate(protocol.q_values, env_cfg, FINAL_EPISODES, seed=seed + 99991).mean
    out = {"steps_to_threshold": None, "seconds_to_threshold": None} | protocol.result
    return out | {"final_eval": final, "train_s": train_s}


def interleaved(first, second, rounds: int) -> tuple[float, float]:
    """Median CPU seconds of two callables, alternated: load from other processes hits neither."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((first, times[0]), (second, times[1])):
            began = time.process_time()
            fn()
            out.append(time.process_time() - began)
    return statistics.median(times[0]), statistics.median(times[1])


def actor_ratio(cfg: Config, steps: int, rounds: int) -> dict:
    """Env steps/s of the actor loop (policy, epsilon, n-step, replay add) vs random actions."""
    raw_env, env = make_vector_env(cfg.env), make_vector_env(cfg.env)
    spec = spec_of(env)
    rng = np.random.default_rng(0)
    raw_env.reset(seed=0)
    learner = Learner(spec, cfg.network, cfg.learner, seed=0)
    actors = Actors(env, spec, cfg.actor, n_step=cfg.replay.n_step, gamma=0.99, seed=0)
    replay = ReplayBuffer(cfg.replay.capacity, spec.obs_shape, spec.obs_dtype)

    def raw() -> None:
        for _ in range(steps):
            raw_env.step(rng.integers(0, spec.n_actions, raw_env.num_envs))

    def ours() -> None:
        for _ in range(steps):
            replay.add(actors.step(learner.q_values).transitions)

    raw_s, ours_s = interleaved(raw, ours, rounds)
    raw_env.close()
    actors.close()
    n = steps * cfg.env.num_envs
    return {"num_envs": cfg.env.num_envs, "raw_env_steps_per_s": n / raw_s,
            "actor_env_steps_per_s": n / ours_s, "ratio": raw_s / ours_s}  # fmt: skip


def bare_update_loop(net, target, optimizer, batch, updates: int, target_every: int) -> None:
    """The same Double DQN update written as a plain PyTorch loop."""
    obs, next_obs = torch.from_numpy(batch.obs), torch.from_numpy(batch.next_obs)
    actions = torch.from_numpy(batch.actions)
    rewards, discounts = torch.from_numpy(batch.rewards), torch.from_numpy(batch.discounts)
    weights = torch.from_numpy(batch.weights)
    for i in range(updates):
        with torch.no_grad():
            targets = td_targets(rewards, discounts, target(next_obs), net(next_obs))
        q = net(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss, _ = td_loss(q, targets, weights, "huber")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        optimizer.step()
        if (i + 1) % target_every == 0:
            target.load_state_dict(net.state_dict())


def learner_ratio(cfg: Config, updates: int, rounds: int) -> dict:
    """Updates/s of Learner.step vs the bare loop, same network, batch and target schedule."""
    env = make_vector_env(cfg.env)
    spec = spec_of(env)
    env.close()
    replay = ReplayBuffer(10_000, spec.obs_shape, spec.obs_dtype)
    rng = np.random.default_rng(0)
    n = 10_000
    obs = rng.normal(size=(n, *spec.obs_shape)).astype(np.float32)
    replay.add(Transitions(obs, rng.integers(0, 2, n), rng.normal(size=n).astype(np.float32),
                           obs, np.full(n, 0.97, np.float32)))  # fmt: skip
    batch = replay.sample(cfg.learner.batch_size)
    learner = Learner(spec, cfg.network, cfg.learner, seed=0)
    net = build_q_network(spec, cfg.network)
    target = build_q_network(spec, cfg.network).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.learner.lr)

    def ours() -> None:
        for _ in range(updates):
            learner.step(batch, td_errors=False)  # uniform replay: the node skips them too

    def bare() -> None:
        bare_update_loop(net, target, optimizer, batch, updates, cfg.learner.target_every)

    ours_s, bare_s = interleaved(ours, bare, rounds)
    return {"learner_updates_per_s": updates / ours_s, "bare_updates_per_s": updates / bare_s,
            "ratio": bare_s / ours_s}  # fmt: skip


def median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(rows: dict[str, list[dict]]) -> dict:
    """Per-framework medians, and ours / SB3."""
    out = {}
    for name, runs in rows.items():
        out[name] = {
            "seconds_to_threshold_median": median([r["seconds_to_threshold"] for r in runs]),
            "steps_to_threshold_median": median([r["steps_to_threshold"] for r in runs]),
            "final_eval_median": median([r["final_eval"] for r in runs]),
            "final_eval_min": min(r["final_eval"] for r in runs),
            "solved": sum(r["steps_to_threshold"] is not None for r in runs),
            "runs": runs,
        }
    ours, sb3 = out.get("gossipdqn"), out.get("sb3")
    if ours and sb3 and sb3["seconds_to_threshold_median"] and ours["seconds_to_threshold_median"]:
        out["seconds_ratio"] = (
            ours["seconds_to_threshold_median"] / sb3["seconds_to_threshold_median"]
        )
        out["steps_ratio"] = ours["steps_to_threshold_median"] / sb3["steps_to_threshold_median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=50_000, help="env steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both")
    parser.add_argument("--skip-sb3", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG)
    rows: dict[str, list[dict]] = {"gossipdqn": [], "sb3": []}
    for seed in range(args.seeds):
        rows["gossipdqn"].append(run_gossipdqn(seed, args.budget))
        print("gossipdqn", seed, rows["gossipdqn"][-1], flush=True)
        if not args.skip_sb3:
            rows["sb3"].append(run_sb3(seed, args.budget))
            print("sb3      ", seed, rows["sb3"][-1], flush=True)
    result = report({k: v for k, v in rows.items() if v})
    result["actor_loop"] = [
        actor_ratio(dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, num_envs=n)),
                    200, 15)
        for n in (8, 32, 128)
    ]  # fmt: skip
    result["learner"] = learner_ratio(cfg, 100, 15)
    result["threads"] = args.threads
    print(json.dumps({k: v for k, v in result.items() if k not in ("gossipdqn", "sb3")}, indent=2))
    for name in ("gossipdqn", "sb3"):
        if name in result:
            print(name, json.dumps({k: v for k, v in result[name].items() if k != "runs"}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
