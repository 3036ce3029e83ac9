"""Short real CartPole runs through the node and the command line."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gossipdqn.config import load_config
from gossipdqn.node.node import Node
from gossipdqn.types import EvalResult


def make_node(run_dir, overrides, **kw):
    return Node(load_config(None, overrides), run_dir, quiet=True, **kw)


def test_short_run_writes_every_output(tmp_path, tiny_overrides):
    node = make_node(tmp_path, tiny_overrides + ["checkpoint.replay=true"])
    try:
        summary = node.run()
    finally:
        node.close()
    for name in ["config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt"]:
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_return_mean" in r]
    assert len(evals) == 3 and len(train) >= 5
    for key in [
        "step",
        "wall_s",
        "return_mean",
        "loss",
        "mean_q",
        "epsilon",
        "env_steps_per_s",
        "updates_per_s",
    ]:
        assert key in train[-1], key
    assert train[-1]["loss"] is not None and train[-1]["updates_per_s"] > 0
    for key in [
        "env_steps",
        "wall_s",
        "final_eval_return_mean",
        "final_eval_return_std",
        "steps_to_threshold",
        "seconds_to_threshold",
    ]:
        assert key in summary
    assert summary["env_steps"] >= 1200 and len(summary["final_eval_returns"]) == 3
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.parametrize("consecutive", [1, 2])
def test_threshold_is_recorded_and_stops_the_run(tmp_path, tiny_overrides, consecutive):
    # CartPole returns are >= 8, so a threshold of 1 is met at every evaluation (every 400 steps)
    node = make_node(
        tmp_path,
        tiny_overrides
        + ["eval.threshold=1", "train.stop_at_threshold=true", f"eval.consecutive={consecutive}"],
    )
    try:
        summary = node.run()
    finally:
        node.close()
    assert summary["steps_to_threshold"] == summary["env_steps"]
    assert 400 * consecutive <= summary["env_steps"] < 400 * consecutive + 4
    assert 0 < summary["seconds_to_threshold"] <= summary["wall_s"]
    assert 0 < summary["cpu_seconds_to_threshold"] <= summary["cpu_s"]


def test_cpu_seconds_count_training_and_not_evaluations(tmp_path, tiny_overrides):
    node = make_node(tmp_path, tiny_overrides)
    evaluate, burned = node.evaluate, []

    def costly_evaluate(episodes):
        began = time.process_time()
        while time.process_time() - began < 0.3:
            pass
        burned.append(time.process_time() - began)
        return evaluate(episodes)

    node.evaluate = costly_evaluate
    began = time.process_time()
    try:
        summary = node.run()
    finally:
        node.close()
    total = time.process_time() - began
    assert len(burned) == 4  # three periodic evaluations and the final one
    training = total - sum(burned)  # the whole run's CPU time but the evaluations
    assert 0.5 * training < summary["cpu_s"] <= training


def test_threshold_needs_consecutive_evaluations(tmp_path, tiny_overrides):
    node = make_node(tmp_path, tiny_overrides + ["eval.consecutive=2"])
    means = iter([500.0, 10.0, 500.0, 500.0])
    node.evaluate = lambda episodes: EvalResult(next(means), 0.0, ())
    try:
        reached = [node._periodic_eval() for _ in range(4)]
    finally:
        node.close()
    assert reached == [False, False, False, True]
    assert node.progress.steps_to_threshold == node.progress.env_steps


def test_checkpoint_resume_restores_counters(tmp_path, tiny_overrides):
    first = make_node(tmp_path, tiny_overrides + ["checkpoint.replay=true"])
    try:
        first.run()
        saved_progress = first.progress
        saved_params = [p.detach().clone() for p in first.learner.online.parameters()]
        saved_eps, saved_replay = first.actors.epsilon(), first.replay.latest(50)
    finally:
        first.close()
    second = make_node(tmp_path, tiny_overrides + ["checkpoint.replay=true"])
    try:
        second.restore(tmp_path / "checkpoint.pt")
        assert second.progress == saved_progress
        assert second.learner.updates == saved_progress.updates
        assert second.actors.epsilon() == saved_eps
        for a, b in zip(saved_params, second.learner.online.parameters()):
            assert torch.equal(a, b)
        for a, b in zip(saved_replay, second.replay.latest(50)):
            assert np.array_equal(a, b)
        assert second.learner.optimizer.state_dict()["state"]
    finally:
        second.close()


def run_cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "gossipdqn", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def test_cli_train_resume_and_eval(tmp_path, tiny_overrides):
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    out = run_cli("train", "--run-dir", str(tmp_path), "--quiet", "--seed", "3", *sets)
    assert out.returncode == 0, out.stderr
    first = json.loads((tmp_path / "summary.json").read_text())
    out = run_cli("train", "--resume", str(tmp_path), "--quiet", "--set", "train.total_steps=1800")
    assert out.returncode == 0, out.stderr
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert resumed["env_steps"] >= 1800 and resumed["updates"] > first["updates"]
    out = run_cli("eval", str(tmp_path), "--episodes", "3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["returns"]) == 3 and result["mean"] > 0
    assert result["returns"] == [float(n) for n in result["lengths"]]  # CartPole pays 1 a step
    assert len(result["truncated"]) == 3


def test_cli_reports_bad_config_without_traceback(tmp_path):
    out = run_cli("train", "--run-dir", str(tmp_path), "--set", "learner.lr=-1")
    assert out.returncode == 2
    assert "learner.lr: expected a value >= 0" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("eval", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no checkpoint there" in out.stderr


def test_a_run_shorter_than_the_progress_interval_ends_on_its_last_line(tmp_path, tiny_overrides):
    sets = [w for s in [*tiny_overrides, "train.progress_every_s=3600"] for w in ("--set", s)]
    out = run_cli("train", "--run-dir", str(tmp_path), *sets)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "st/s" in line]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(lines) == 1 and f"step {summary['env_steps']:>8,}" in lines[0], out.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint_and_exits_zero(tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gossipdqn", "train", "--run-dir", str(tmp_path),
         "--set", "train.total_steps=10000000", "--set", "train.progress_every_s=0.2",
         "--set", "checkpoint.every_steps=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("gossipdqn: training")
        assert "st/s" in proc.stdout.readline()  # the loop is running: a progress line came
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert (tmp_path / "checkpoint.pt").is_file()
        assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True
    finally:
        proc.kill()
        proc.wait()
