"""Baselines on real processes over loopback: all-reduce, parameter server, their failures."""

import dataclasses
import json
import threading

import pytest
import torch

from gossipdqn.baselines import run
from gossipdqn.config import load_config
from gossipdqn.node.checkpoint import load_checkpoint

LIMIT_S = 90.0


@pytest.fixture
def small(tiny_overrides):
    """The tiny CartPole settings as command-line arguments, no progress lines."""
    sets = [*tiny_overrides, "eval.every_steps=0", "train.total_steps=1600"]
    return [a for s in sets for a in ("--set", s)] + ["--quiet"]


def run_bounded(commands, workers, kill=None):
    """run.run_group with a hard limit: every process is stopped by then, pass or fail."""
    stop = threading.Event()
    timer = threading.Timer(LIMIT_S, stop.set)
    timer.start()
    try:
        codes, killed = run.run_group(commands, stop, workers=workers, kill=kill)
    finally:
        timer.cancel()
    assert not stop.is_set(), f"the run did not end within {LIMIT_S} s"
    return codes, killed


def summary(path):
    return json.loads((path / "summary.json").read_text())


def test_allreduce_two_workers_stay_bit_identical(tmp_path, small):
    codes, _ = run_bounded(run.allreduce_commands(2, tmp_path, small), slice(None))
    assert codes == [0, 0]
    nodes = [summary(tmp_path / f"node-{r}") for r in range(2)]
    for node in nodes:
        assert node["updates"] >= 300
        assert node["exchange"]["identity_checks"] >= 3
        assert node["exchange"]["identity_mismatches"] == 0
    if nodes[0]["updates"] == nodes[1]["updates"]:  # else a drained worker applied more
        a, b = (load_checkpoint(tmp_path / f"node-{r}" / "checkpoint.pt") for r in range(2))
        for key, value in a["learner"]["online"].items():
            assert torch.equal(value, b["learner"]["online"][key]), key


def test_parameter_server_applies_gradients_from_both_workers(tmp_path, small):
    codes, _ = run_bounded(run.ps_commands(2, tmp_path, small, pull_every=10), slice(1, None))
    assert codes[1:] == [0, 0]
    server = summary(tmp_path / "server")
    workers = [summary(tmp_path / f"node-{r}")["exchange"] for r in range(2)]
    for rank, worker in zip(("1", "2"), workers):
        assert server["applied_by_worker"][rank] > 100
        assert server["params_sent_by_worker"][rank] > 10
        assert worker["params_loaded"] > 10
        assert worker["sent_gradients"] >= server["applied_by_worker"][rank]
    state = torch.load(tmp_path / "server" / "server.pt", weights_only=True)
    n_params = sum(t.numel() for t in state.values())
    assert server["bytes_in"] > 4 * n_params * server["updates"]  # one float32 vector each


def test_killing_the_server_stops_workers_with_a_clear_error(tmp_path, small, capsys):
    longer = [*small, "--set", "train.total_steps=100000", "--set", "gossip.peer_timeout_s=1"]
    kill = run.Kill(0, tmp_path / "node-0" / "metrics.jsonl", at_step=400)
    codes, killed = run_bounded(run.ps_commands(2, tmp_path, longer, 10), slice(1, None), kill)
    assert killed is not None and codes[0] == -9
    assert codes[1:] == [run.LOST_EXIT, run.LOST_EXIT]
    out = capsys.readouterr().out
    assert out.count("error: parameter server at tcp://127.0.0.1:") == 2
    assert "Traceback" not in out
    for rank in range(2):
        worker = summary(tmp_path / f"node-{rank}")
        assert worker["interrupted"] and "silent" in worker["exchange"]["server_lost"]


def test_killing_an_allreduce_worker_stops_the_other(tmp_path, small, capsys):
    longer = [*small, "--set", "train.total_steps=100000"]
    kill = run.Kill(1, tmp_path / "node-0" / "metrics.jsonl", at_step=400)
    codes, killed = run_bounded(run.allreduce_commands(2, tmp_path, longer), slice(None), kill)
    assert killed is not None and codes == [run.LOST_EXIT, -9]
    out = capsys.readouterr().out
    assert "error: all-reduce failed: a worker left or died" in out
    assert "Traceback" not in out


def test_scale_actors_multiplies_actors_and_every_step_budget():
    cfg = load_config(None, [])
    scaled = run.scale_actors(cfg, 3)
    assert scaled.env.num_envs == 3 * cfg.env.num_envs
    assert scaled.train.total_steps == 3 * cfg.train.total_steps
    assert scaled.actor.eps_decay_steps == 3 * cfg.actor.eps_decay_steps
    assert scaled.learner.learning_starts == 3 * cfg.learner.learning_starts
    assert scaled.eval.every_steps == 3 * cfg.eval.every_steps
    assert scaled.learner.updates_per_step == cfg.learner.updates_per_step
    assert run.scale_actors(cfg, 1) == cfg


def test_scale_actors_scales_every_setting_counted_in_env_steps():
    """A schedule left unscaled would run N times faster for the ideal (lr_decay_steps did)."""
    cfg = load_config(None, ["learner.lr_decay_steps=3000", "learner.lr_end=1e-4"])
    scaled = run.scale_actors(cfg, 3)
    counted = [
        (section.name, f.name)
        for section in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, section.name))
        for f in dataclasses.fields(getattr(cfg, section.name))
        if "env steps" in f.metadata["doc"]
    ]
    assert ("learner", "lr_decay_steps") in counted
    unscaled = [
        f"{s}.{name}"
        for s, name in counted
        if getattr(getattr(scaled, s), name) != 3 * getattr(getattr(cfg, s), name)
    ]
    assert unscaled == []


@pytest.mark.parametrize("mode", ["ps", "allreduce"])  # gossip and single: tests/test_scaling.py
def test_every_mode_stops_at_the_threshold_with_its_cpu_seconds(tmp_path, small, mode):
    # CartPole returns are >= 8: a threshold of 1 is met at every evaluation (every 400 steps)
    sets = ["eval.every_steps=400", "eval.threshold=1", "train.stop_at_threshold=true"]
    passthrough = [*small, *(a for s in sets for a in ("--set", s))]
    if mode == "ps":
        commands, workers = run.ps_commands(2, tmp_path, passthrough, pull_every=10), slice(1, None)
    else:
        commands, workers = run.allreduce_commands(2, tmp_path, passthrough), slice(None)
    codes, _ = run_bounded(commands, workers)
    assert codes[workers] == [0, 0]
    for rank in range(2):
        node = summary(tmp_path / f"node-{rank}")
        assert node["steps_to_threshold"] == node["env_steps"] < 1600, (rank, node)
        assert 0 < node["cpu_seconds_to_threshold"] <= node["cpu_s"]
