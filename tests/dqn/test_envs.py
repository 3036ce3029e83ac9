"""MinAtar and Atari environments, alone and trained on through the node for a few hundred steps."""

import json
import sys

import numpy as np
import pytest

from gossipdqn.config import EnvConfig, load_config
from gossipdqn.dqn.envs import EnvError, atari_game, make_vector_env
from gossipdqn.dqn.frame_replay import FrameReplay
from gossipdqn.node.node import Node

pytestmark = pytest.mark.timeout(120)

SHORT = [
    "train.total_steps=300", "learner.learning_starts=200", "learner.batch_size=8",
    "train.log_every_steps=100", "eval.every_steps=0", "eval.final_episodes=1",
    "checkpoint.every_steps=0", "env.num_envs=2", "replay.capacity=1000",
]  # fmt: skip


def run_node(tmp_path, overrides):
    node = Node(load_config(None, SHORT + overrides), tmp_path, quiet=True)
    try:
        summary = node.run()
        return node, summary
    finally:
        node.close()


def test_atari_game_names():
    assert atari_game("ALE/Pong-v5") == "pong"
    assert atari_game("ALE/SpaceInvaders-v5") == "space_invaders"


def test_missing_extras_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py.vector_env", None)
    with pytest.raises(EnvError, match=r"gossipdqn\[atari\]"):
        make_vector_env(EnvConfig(id="ALE/Pong-v5"))
    monkeypatch.setitem(sys.modules, "minatar.gym", None)
    with pytest.raises(EnvError, match=r"gossipdqn\[minatar\]"):
        make_vector_env(EnvConfig(id="MinAtar/Breakout-v1"))


def test_minatar_trains_through_the_node(tmp_path):
    pytest.importorskip("minatar")
    node, summary = run_node(tmp_path, ["env.id=MinAtar/Breakout-v1"])
    assert node.spec.obs_shape == (10, 10, 4) and summary["updates"] > 0
    assert np.isfinite(summary["final_eval_return_mean"])
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss") is not None for r in records)


@pytest.mark.parametrize("processes", [0, 1])
def test_atari_trains_through_the_node_on_frames(tmp_path, processes):
    pytest.importorskip("ale_py")
    overrides = ["env.id=ALE/Breakout-v5", "env.max_episode_steps=100"]
    node, summary = run_node(tmp_path, [*overrides, f"actor.processes={processes}"])
    assert isinstance(node.replay, FrameReplay) and summary["updates"] > 0
    assert node.replay.written < 1.3 * len(node.replay) + 64  # about one frame per transition
    batch = node.replay.sample(4)
    assert batch.obs.shape == (4, 4, 84, 84) and batch.obs.dtype == np.uint8
