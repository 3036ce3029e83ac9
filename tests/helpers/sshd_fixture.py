"""A throwaway sshd on two loopback addresses, with its own host key, user key and port."""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")
ADDRESSES = ("127.0.0.1", "127.0.0.2")


@dataclass(frozen=True)
class SshServer:
    """A running test sshd: where it listens, who may log in, with which key."""

    port: int
    key: Path
    user: str
    log: Path

    def ssh_option(self) -> str:
        """The `--ssh-option` string that logs in with the throwaway key, trusting any host key."""
        options = [
            "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        return shlex.join(options)


def _free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_config(tmp: Path, port: int) -> Path:
    """sshd_config for a loopback-only server that accepts only the throwaway key."""
    lines = [f"ListenAddress {address}" for address in ADDRESSES] + [
        f"Port {port}",
        f"HostKey {tmp / 'host_key'}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        f"PidFile {tmp / 'sshd.pid'}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "StrictModes no",
        "UsePAM no",
        "MaxStartups 100",
        "MaxSessions 100",
        "LogLevel VERBOSE",
    ]
    config = tmp / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    return config


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    """Poll until sshd accepts on every address, or fail with its log."""
    deadline = time.monotonic() + timeout
    pending = list(ADDRESSES)
    while pending:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not start: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((pending[0], port), timeout=0.5).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.05)


def start_sshd(tmp: Path) -> tuple[SshServer, subprocess.Popen[bytes]]:
    """Make keys and a config in `tmp`, start sshd and wait until it listens."""
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True
        )
    shutil.copy(tmp / "user_key.pub", tmp / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = _free_port()
    log = tmp / "sshd.log"
    with log.open("wb") as sink:
        command = [str(SSHD), "-D", "-e", "-f", str(_write_config(tmp, port))]
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc, port, log, timeout=15)
    except RuntimeError:
        _stop(proc)
        raise
    return SshServer(port, tmp / "user_key", getpass.getuser(), log), proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate sshd, killing it if it lingers."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A running throwaway sshd for the module's tests; skipped where sshd is not installed."""
    if not SSHD.exists() or shutil.which("ssh") is None:
        pytest.skip("needs openssh-server and openssh-client (apt-get install openssh-server)")
    server, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        _stop(proc)
