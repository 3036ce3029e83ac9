"""Actor processes stream to the learner over ipc://; the node trains on what they send."""

import json
import os
import signal
import time

import numpy as np
import pytest
import torch
from helpers.waiting import wait_for

from gossipdqn.config import load_config
from gossipdqn.dqn.actors import ape_x_epsilons, linear_epsilon
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.networks import build_q_network
from gossipdqn.node.actor_processes import ActorPool
from gossipdqn.node.node import node_of_rank

pytestmark = pytest.mark.timeout(120)


def small_cfg(*extra):
    return load_config(None, ["env.num_envs=2", "network.hidden=[16]", *extra])


def make_pool(cfg):
    env = make_vector_env(cfg.env, num_envs=1)
    net = build_q_network(spec_of(env), cfg.network)
    env.close()
    return ActorPool(cfg, frames=False, policy=net, device=torch.device("cpu"))


def collect(pool, until, deadline_s=60.0):
    """Receive until `until(received)` holds or the deadline passes."""
    received, deadline = [], time.monotonic() + deadline_s
    while not until(received) and time.monotonic() < deadline:
        pool.check()
        received += pool.receive(timeout_s=0.2)
    return received


def per_actor(received, actor, version=None):
    return [r for r in received if r.actor == actor and version in (None, r.version)]


@pytest.mark.parametrize("inference", ["local", "learner"])
def test_two_actors_deliver_every_step_in_order_with_epsilon_over_the_nodes_steps(inference):
    cfg = small_cfg("actor.processes=2", f"actor.inference={inference}")
    decay = cfg.actor.eps_decay_steps
    pool = make_pool(cfg)
    try:
        got = collect(pool, lambda r: min(len(per_actor(r, a)) for a in (0, 1)) >= 30)
        pool.publish(version=1, env_steps=decay)  # the node has stepped through the decay
        got += collect(pool, lambda r: min(len(per_actor(r, a, 1)) for a in (0, 1)) >= 3)
    finally:
        pool.close()
    assert all(not p.is_alive() for p in pool.procs)
    for actor in (0, 1):
        before = per_actor(got, actor, 0)
        own = np.cumsum([0] + [r.env_steps for r in before])[:-1]
        # between policies a process counts the node's steps as 2 processes stepping alike
        assert [r.epsilon for r in before] == [linear_epsilon(2 * int(s), cfg.actor) for s in own]
        after = per_actor(got, actor, 1)[1:]  # from the policy carrying the node's count on
        assert after and {r.epsilon for r in after} == {linear_epsilon(decay, cfg.actor)}
        mine = per_actor(got, actor)
        assert [r.seq for r in mine] == list(range(len(mine))) and len(mine) >= 33
        steps, sent = sum(r.env_steps for r in mine), sum(len(r.transitions) for r in mine)
        assert steps - 3 * 2 <= sent <= steps  # all but those pending in the 3-step accumulators
        obs = np.concatenate([r.transitions.obs for r in mine])
        assert obs.shape[1:] == (4,) and np.isfinite(obs).all()


def test_killed_actor_is_restarted_and_acts_with_the_current_policy_from_its_first_step():
    pool = make_pool(small_cfg("actor.processes=1"))
    try:
        first = collect(pool, lambda r: len(r) >= 3)
        assert first and first[0].version == 0  # the policy it got on subscribing, not its own
        pool.publish(version=7, env_steps=0)
        os.kill(pool.procs[0].pid, signal.SIGKILL)
        pool.procs[0].join(timeout=10)
        got = collect(pool, lambda r: any(x.stream != 0 for x in r))
        assert pool.restarts == 1 and pool.incarnations[0] == 1
        fresh = [r for r in got if r.stream == pool.stream_of(0, 1)]
        assert fresh and fresh[0].seq == 0 and fresh[0].version == 7
    finally:
        pool.close()
    assert not pool.procs[0].is_alive()


@pytest.mark.parametrize("extra", [[], ["learner.prefetch=true", "learner.metrics_every=4"]])
def test_node_with_actor_processes_holds_the_replay_ratio_and_its_ape_x_rungs(tmp_path, extra):
    cfg = small_cfg(
        "actor.processes=2", "learner.learning_starts=100", "learner.updates_per_step=0.5",
        "learner.batch_size=16", "actor.refresh_every=10", "train.total_steps=600",
        "eval.every_steps=0", "eval.final_episodes=1", "checkpoint.every_steps=0",
        "train.log_every_steps=100", "actor.ape_x=true", *extra,
    )  # fmt: skip
    node = node_of_rank(cfg, tmp_path, rank=1, world=2, quiet=True)  # actors 4..7 of 8
    try:
        summary = node.run()
        # a process slow to spawn may not have stepped within the run's 600 steps: wait for it
        wait_for(lambda: heard_from_all(node.pool), 60, "a step from each actor process")
    finally:
        node.close()
    assert summary["env_steps"] >= 600
    lag = 0.5 * (summary["env_steps"] - 100) - summary["updates"]
    assert 0 <= lag <= 0.5 * 2 * 2 + 1  # at most the last vector step of each actor behind
    assert any("receive" in key for key in summary["time_split"])
    for actor in (0, 1):  # process p of node 1 acts with the rungs of actors 4 + 2p, 5 + 2p
        rungs = ape_x_epsilons(4 + 2 * actor + np.arange(2), 8, cfg.actor)
        assert node.pool.epsilons[actor] == float(np.mean(rungs))
    own = ape_x_epsilons(np.arange(4, 8), 8, cfg.actor)  # node 0's rungs are all above these
    assert node.pool.epsilon() == pytest.approx(np.mean(own))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["epsilon"] for r in records if r.get("epsilon") is not None]
    assert logged and all(own.min() <= e <= own.max() for e in logged)  # the log: its own rungs


def heard_from_all(pool: ActorPool) -> bool:
    """Take in what the actor processes sent; whether each has reported a step by now."""
    pool.receive(0.1)
    return not np.isnan(pool.epsilons).any()
