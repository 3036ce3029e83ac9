"""`sbatch launch/slurm.sbatch` on a real one-machine Slurm: two gossip nodes train, gossip and
finish; `scancel` stops a running job and leaves no node process behind."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers.slurm_fixture import SlurmCluster, slurm  # noqa: F401  (the fixture)
from helpers.waiting import wait_for

from gossipdqn.config import config_to_toml, load_config

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm.sbatch"
SETTINGS = [
    "train.log_every_steps=100", "train.progress_every_s=0.5", "learner.learning_starts=100",
    "learner.batch_size=16", "env.num_envs=2", "network.hidden=[16,16]", "eval.every_steps=0",
    "eval.final_episodes=1", "checkpoint.every_steps=0", "gossip.interval=4",
    "gossip.share_every=64", "gossip.share_batch=16", "gossip.heartbeat_s=0.2",
]  # fmt: skip
"""Two small CartPole nodes that send parameters and experience within a few hundred steps."""
pytestmark = pytest.mark.timeout(120)


def submit(cluster: SlurmCluster, tmp: Path, total_steps: int) -> tuple[int, Path]:
    """sbatch the repo's script with 2 tasks here, as launch/README.md shows; job and run dir."""
    config = tmp / "tiny.toml"
    cfg = load_config(None, [*SETTINGS, f"train.total_steps={total_steps}"])
    config.write_text(config_to_toml(cfg))
    run_dir = tmp / "run"
    env = {"CONFIG": str(config), "RUN_DIR": str(run_dir), "PYTHON": sys.executable}
    job = cluster.sbatch(
        "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
        f"--output={tmp / 'job-%j.out'}", f"--chdir={tmp}", str(SBATCH), env=env,
    )  # fmt: skip
    return job, run_dir


def job_output(tmp: Path, job: int) -> str:
    path = tmp / f"job-{job}.out"
    return path.read_text()[-3000:] if path.exists() else "(no job output)"


def ended(cluster: SlurmCluster, job: int) -> bool:
    return cluster.state(job) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_naming(path: Path) -> list[str]:
    """Live processes whose command line names `path`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and alive(int(entry.name)):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found += [f"{entry.name} {cmd}"] if str(path) in cmd else []
    return found


def test_sbatch_runs_two_nodes_that_gossip_and_finish(slurm: SlurmCluster, tmp_path):  # noqa: F811
    job, run_dir = submit(slurm, tmp_path, total_steps=700)
    wait_for(lambda: ended(slurm, job), 90, f"job {job} to end")
    assert slurm.state(job) == "COMPLETED", job_output(tmp_path, job)
    output = job_output(tmp_path, job)
    for rank in (0, 1):
        summary = json.loads((run_dir / f"node-{rank}" / "summary.json").read_text())
        assert summary["env_steps"] >= 700 and summary["final_eval_return_mean"] is not None
        exchange = summary["exchange"]
        assert exchange["gossip_recv_params"] > 0 and exchange["gossip_recv_experience"] > 0
        assert exchange["peers_alive"] == 1 and not exchange.get("insecure"), exchange
        assert f"{rank}: [node {rank}]  step" in output  # srun --label, then the node's line


def test_scancel_stops_the_job_and_leaves_no_node_behind(slurm: SlurmCluster, tmp_path):  # noqa: F811
    job, run_dir = submit(slurm, tmp_path, total_steps=100_000_000)
    started = [run_dir / f"node-{rank}" / "process.json" for rank in (0, 1)]
    wait_for(lambda: all(p.exists() for p in started) or ended(slurm, job), 60,
             "both nodes to start")  # fmt: skip
    assert slurm.state(job) == "RUNNING", job_output(tmp_path, job)
    pids = [json.loads(p.read_text())["pid"] for p in started]
    assert all(alive(pid) for pid in pids) and processes_naming(run_dir)  # the check can see them
    slurm.run("scancel", str(job))
    wait_for(lambda: ended(slurm, job), 30, f"job {job} to be cancelled")
    assert slurm.state(job) == "CANCELLED"
    wait_for(lambda: not any(alive(pid) for pid in pids), 15, "the node processes to exit")
    assert processes_naming(run_dir) == []
