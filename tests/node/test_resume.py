"""A resume without a saved replay collects `learner.learning_starts` steps again."""

from gossipdqn.config import load_config
from gossipdqn.node.node import Node

SETTINGS = [
    "env.num_envs=2", "network.hidden=[16]", "learner.learning_starts=100",
    "learner.batch_size=16", "learner.updates_per_step=0.5", "train.total_steps=300",
    "eval.every_steps=0", "eval.final_episodes=1", "checkpoint.every_steps=0",
]  # fmt: skip


def test_resume_without_replay_waits_for_learning_starts_then_holds_the_ratio(tmp_path):
    cfg = load_config(None, SETTINGS)
    first = Node(cfg, tmp_path, quiet=True)
    try:
        first.run()
        saved = first.progress
    finally:
        first.close()
    assert saved.updates == int((saved.env_steps - 100) * 0.5)
    second = Node(cfg, tmp_path, quiet=True)
    try:
        second.restore(tmp_path / "checkpoint.pt")
        assert len(second.replay) == 0 and second.progress.env_steps == saved.env_steps
        seen = []
        while second.progress.env_steps < saved.env_steps + 200:
            second.train_step()
            p = second.progress
            seen.append((p.env_steps - saved.env_steps, p.updates, len(second.replay)))
    finally:
        second.close()
    waiting = [(updates, size) for steps, updates, size in seen if steps < 100]
    assert max(size for _, size in waiting) >= 16  # a batch was there; learning_starts held it
    assert {updates for updates, _ in waiting} == {saved.updates}
    steps, updates, _ = seen[-1]
    assert updates - saved.updates == int((steps - 100) * 0.5)
