"""The learner's acting copy: one path on every device, refreshed on its schedule."""

import torch

from gossipdqn.config import load_config
from gossipdqn.dqn.evaluate import evaluate
from gossipdqn.node.node import Node


def tiny_node(run_dir):
    cfg = load_config(None, [
        "env.num_envs=2", "network.hidden=[16]", "learner.learning_starts=32",
        "learner.batch_size=16", "learner.updates_per_step=0.5", "eval.eps=0",
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
        expected = learner.online(torch.from_numpy(obs)).detach().numpy()
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
        current = evaluate(
            lambda o: learner.online(torch.from_numpy(o)).detach().numpy(), node.cfg.env, 3,
            seed=seed, eps=0.0,
        )  # fmt: skip
        assert stale.returns != current.returns  # the stale copy plays differently
        assert node.evaluate(3).returns == current.returns
    finally:
        node.close()
