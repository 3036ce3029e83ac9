"""A throwaway one-machine Slurm cluster: munged, slurmctld and slurmd with state in a temp dir.

This host is the only node (2 CPUs), ports are free ones, the munge key and socket are the
cluster's own, and every client command finds it through `SLURM_CONF`. Debian's `slurm-wlm` and
`munge` packages provide the daemons (`.ci/run` installs them when missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.waiting import wait_for

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "squeue", "sinfo")
START_S = 30.0
"""Hard limit on the cluster coming up."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: its config, its temp dir, and the client environment."""

    conf: Path
    tmp: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Our environment with `SLURM_CONF` pointing at this cluster (plus `extra`)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, *argv: str, env: Mapping[str, str] | None = None) -> str:
        """Run a Slurm client command against this cluster; its stdout (fails loudly)."""
        done = subprocess.run(
            list(argv), env=self.env(env), capture_output=True, text=True, timeout=20
        )
        if done.returncode:
            raise AssertionError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, *argv: str, env: Mapping[str, str] | None = None) -> int:
        """Submit a batch job; its id."""
        return int(self.run("sbatch", "--parsable", *argv, env=env).strip().split(";")[0])

    def state(self, job: int) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, CANCELLED, ...); '' once forgotten."""
        return self.run("squeue", "-h", "-t", "all", "-j", str(job), "-o", "%T").strip()


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _write_conf(tmp: Path, host: str) -> Path:
    ctld_port, slurmd_port = _free_ports(2)
    lines = [
        "ClusterName=gossipdqntest", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={tmp / 'munge.sock'}",
        f"StateSaveLocation={tmp / 'state'}", f"SlurmdSpoolDir={tmp / 'spool'}",
        f"SlurmctldPidFile={tmp / 'slurmctld.pid'}", f"SlurmdPidFile={tmp / 'slurmd.pid'}",
        f"SlurmctldLogFile={tmp / 'slurmctld.log'}", f"SlurmdLogFile={tmp / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SwitchType=switch/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin", "ReturnToService=2", "KillWait=5", "MinJobAge=300",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "InactiveLimit=0", "SlurmdTimeout=30",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]  # fmt: skip
    conf = tmp / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start(argv: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon's group, SIGKILL it 10 s later if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _idle(cluster: SlurmCluster, daemons: list[subprocess.Popen[bytes]]) -> bool:
    if any(proc.poll() is not None for proc in daemons):
        logs = [(cluster.tmp / name).read_text()[-1500:] for name in ("ctld.out", "slurmd.out")]
        raise RuntimeError(f"a Slurm daemon exited: {logs}")
    done = subprocess.run(
        ["sinfo", "-h", "-o", "%t"], env=cluster.env(), capture_output=True, text=True, timeout=10
    )
    return done.stdout.strip() == "idle"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster for the module's tests; every job and daemon gone afterwards."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing); install the "
                    "Debian packages slurm-wlm and munge (.ci/run does)")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root; run the tests as root")
    tmp = tmp_path_factory.mktemp("slurm")
    for name in ("state", "spool"):
        (tmp / name).mkdir()
    (tmp / "munge.key").write_bytes(os.urandom(1024))
    (tmp / "munge.key").chmod(0o600)
    cluster = SlurmCluster(_write_conf(tmp, socket.gethostname().split(".")[0]), tmp)
    munge = [
        "munged", "-F", "-f", f"--key-file={tmp / 'munge.key'}", f"--socket={tmp / 'munge.sock'}",
        f"--pid-file={tmp / 'munged.pid'}", f"--seed-file={tmp / 'munged.seed'}",
        f"--log-file={tmp / 'munged.log'}",
    ]  # fmt: skip
    daemons = [_start(munge, tmp / "munged.out", cluster.env())]
    try:
        wait_for(lambda: (tmp / "munge.sock").exists(), START_S, "munged's socket")
        daemons.append(_start(["slurmctld", "-D", "-i"], tmp / "ctld.out", cluster.env()))
        daemons.append(_start(["slurmd", "-D"], tmp / "slurmd.out", cluster.env()))
        wait_for(lambda: _idle(cluster, daemons), START_S, "the Slurm node to be idle")
        yield cluster
    finally:
        with contextlib.suppress(AssertionError, subprocess.SubprocessError, OSError):
            jobs = cluster.run("squeue", "-h", "-o", "%i").split()
            if jobs:
                cluster.run("scancel", *jobs)
                wait_for(lambda: not cluster.run("squeue", "-h", "-o", "%i").split(), 20,
                         "the cancelled jobs to end")  # fmt: skip
        for proc in reversed(daemons):
            _stop(proc)
