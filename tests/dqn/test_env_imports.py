"""`env.imports`: a user's module that registers a gymnasium id, imported wherever envs are made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from gossipdqn.cli import main
from gossipdqn.config import EnvConfig
from gossipdqn.dqn.envs import EnvError, make_vector_env

CORRIDOR = '''"""A corridor of 4 cells: action 1 walks right, reward 1 at its end (a user's env)."""
import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    observation_space = gym.spaces.Box(0.0, 4.0, shape=(1,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cell = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.cell = max(0, self.cell + (1 if action == 1 else -1))
        done = self.cell == 4
        return np.array([self.cell], dtype=np.float32), float(done), done, False, {}


gym.register("{env_id}", entry_point=__name__ + ":Corridor", max_episode_steps=30)
'''


def write_env_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A fresh module (unique name and id, so no test sees another's) on sys.path."""
    tag = uuid.uuid4().hex[:8]
    module, env_id = f"corridor_{tag}", f"Corridor{tag}-v0"
    (tmp_path / f"{module}.py").write_text(CORRIDOR.replace("{env_id}", env_id))
    monkeypatch.syspath_prepend(str(tmp_path))
    return module, env_id


def test_an_id_registered_by_a_listed_module_can_be_made(tmp_path, monkeypatch):
    module, env_id = write_env_module(tmp_path, monkeypatch)
    with pytest.raises(EnvError, match=env_id):  # not imported: gymnasium does not know the id
        make_vector_env(EnvConfig(id=env_id, num_envs=2))
    env = make_vector_env(EnvConfig(id=env_id, imports=(module,), num_envs=2))
    try:
        obs, _ = env.reset(seed=0)
        assert obs.tolist() == [[0.0], [0.0]]
        for expected in (1.0, 2.0, 3.0):  # walking right: the cell number, computed by hand
            obs, reward, *_ = env.step(np.array([1, 1]))
            assert obs.tolist() == [[expected], [expected]] and reward.tolist() == [0.0, 0.0]
        _, reward, terminated, *_ = env.step(np.array([1, 0]))
        assert reward.tolist() == [1.0, 0.0] and terminated.tolist() == [True, False]
    finally:
        env.close()


def test_a_module_that_cannot_be_imported_is_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_envs_mod.py").write_text("raise RuntimeError('no licence file')\n")
    with pytest.raises(EnvError, match=r"env.imports: cannot import 'no_such_envs_mod'"):
        make_vector_env(EnvConfig(imports=("no_such_envs_mod",)))
    with pytest.raises(EnvError, match=r"'broken_envs_mod' \(RuntimeError: no licence file\)"):
        make_vector_env(EnvConfig(imports=("broken_envs_mod",)))


def test_local_refuses_a_missing_module_before_any_node_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["local", "-n", "2", "--run-dir", str(run_dir), "--set", 'env.imports=["nope_envs"]']
    assert main(argv) == 2
    assert "env.imports: cannot import 'nope_envs'" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.timeout(60)
def test_a_node_its_actor_process_and_its_evaluation_import_the_module(tmp_path, monkeypatch):
    """A node process (as every launcher starts one) with a spawned actor process, on the env."""
    module, env_id = write_env_module(tmp_path, monkeypatch)
    settings = [
        f"env.id={env_id}", f'env.imports=["{module}"]', "env.num_envs=2", "actor.processes=1",
        "train.total_steps=300", "learner.learning_starts=100", "learner.batch_size=16",
        "network.hidden=[16,16]", "eval.every_steps=0", "eval.final_episodes=2",
        "checkpoint.every_steps=0",
    ]  # fmt: skip
    sets = [word for setting in settings for word in ("--set", setting)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "gossipdqn", "train", "--run-dir", str(tmp_path / "run"),
         "--quiet", *sets],
        capture_output=True, text=True, timeout=50, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env_steps"] >= 300
    assert 0.0 <= summary["final_eval_return_mean"] <= 1.0  # the corridor pays 0 or 1
