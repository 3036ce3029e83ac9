"""The learner: its acting copy (one path on every device, refreshed on schedule), its lr decay."""

import pytest
import torch

from gossipdqn.config import load_config
from gossipdqn.dqn.evaluate import evaluate
from gossipdqn.node.node import Node


def tiny_node(run_dir, *overrides):
    cfg = load_config(None, [
        "env.num_envs=2", "network.hidden=[16]", "learner.learning_starts=32",
        "learner.batch_size=16", "learner.updates_per_step=0.5", "eval.eps=0", *overrides,
    ])  # fmt: skip
    return Node(cfg, run_dir, quiet=True)


def acting_flat(node):
    return torch.cat([p.detach().reshape(-1) for p in node.learner.actor_net.parameters()])


def test_acting_copy_follows_every_update_of_the_node_loop(tmp_path):
    node = tiny_node(tmp_path)
    learner = node.learner
    try:
        initial = acting_flat(node).clone()
        obs = node.actors.obs.copy()
        while node.progress.updates < 20:
            node.train_step()
        assert not torch.equal(learner.online_flat, initial)  # the learner moved
        assert torch.equal(acting_flat(node), learner.online_flat)  # and the actors with it
        # a copy, the same one on every device: a change to the online net outside an update
        # reaches the actors only with the next refresh
        before = learner.q_values(obs)
        with torch.no_grad():
            learner.online_flat.mul_(-1.0)
        assert torch.equal(torch.from_numpy(learner.q_values(obs)), torch.from_numpy(before))
        learner.sync_actor_net()
        expected = learner.online(torch.from_numpy(obs).to(learner.device)).detach().cpu().numpy()
        assert torch.allclose(torch.from_numpy(learner.q_values(obs)), torch.from_numpy(expected))
    finally:
        node.close()


def balance(net):
    """Make `net` the CartPole policy 'push toward where the pole falls' (long episodes)."""
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    state["body.1.weight"][0, 2:] = 1.0  # relu(angle + angular velocity)
    state["body.1.weight"][1, 2:] = -1.0
    state["advantage.weight"][1, 0] = state["advantage.weight"][0, 1] = 1.0
    net.load_state_dict(state)


def test_evaluation_plays_the_current_online_net(tmp_path):
    node = tiny_node(tmp_path)
    learner = node.learner
    try:
        while node.progress.updates < 5:
            node.train_step()
        balance(learner.online)  # as an exchange would load parameters, without a refresh
        seed = node.cfg.seed + 1_000_003 * (node.progress.evals + 1)
        stale = evaluate(learner.q_values, node.cfg.env, 3, seed=seed, eps=0.0)
        def online_now(obs):
            return learner.online(torch.from_numpy(obs).to(learner.device)).detach().cpu().numpy()

        current = evaluate(online_now, node.cfg.env, 3, seed=seed, eps=0.0)
        assert stale.returns != current.returns  # the stale copy plays differently
        assert node.evaluate(3).returns == current.returns
    finally:
        node.close()


def test_learning_rate_decays_linearly_over_env_steps_then_holds(tmp_path):
    node = tiny_node(tmp_path, "learner.lr=1e-3", "learner.lr_end=1e-4",
                     "learner.lr_decay_steps=200")  # fmt: skip
    try:
        lrs = {}  # env steps -> lr, once updates run
        while node.progress.env_steps < 300:
            node.train_step()
            if node.progress.updates:
                lrs[node.progress.env_steps] = node.learner.optimizer.param_groups[0]["lr"]
        decaying = [lrs[s] for s in sorted(lrs) if s <= 200]
        assert decaying[0] < 1e-3  # updates started after 32 steps: already below lr
        assert decaying == sorted(decaying, reverse=True) and len(set(decaying)) > 10
        assert lrs[max(lrs)] == pytest.approx(1e-4)  # held at lr_end after lr_decay_steps
        assert node._record()["lr"] == pytest.approx(1e-4)  # in the metrics
        assert node.learner.follow_lr_schedule(100) == pytest.approx(5.5e-4)  # halfway
    finally:
        node.close()


def test_learning_rate_stays_constant_without_a_decay(tmp_path):
    node = tiny_node(tmp_path, "learner.lr=1e-3", "learner.lr_end=1e-4")
    try:
        while node.progress.updates < 20:
            node.train_step()
        assert node.learner.optimizer.param_groups[0]["lr"] == 1e-3
    finally:
        node.close()


@pytest.mark.parametrize(
    ("extra", "seen_at", "errors"),
    [("replay.prioritized=true", 2, "16 of 16"), ("learner.metrics_every=3", 3, "0 of 0")],
)
def test_a_learner_whose_loss_is_not_finite_stops_with_the_reason(tmp_path, extra, seen_at, errors):
    """Seen where the loss or TD errors reach the host: every update with priorities, else at
    the metrics sync."""
    node = tiny_node(tmp_path, extra)
    try:
        while node.progress.updates < 1:
            node.train_step()
        with torch.no_grad():
            next(node.learner.online.parameters())[0, 0] = float("nan")
        match = rf"diverged: TD loss is nan at update {seen_at} \({errors} TD.*learner.lr"
        with pytest.raises(FloatingPointError, match=match):
            for _ in range(10):
                node.train_step()
        assert node.progress.updates == seen_at - 1  # the failed step counted nowhere
    finally:
        node.close()
