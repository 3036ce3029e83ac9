"""A launched run's CURVE keys: made here, handed to each host on ssh's stdin, never on a
command line; on the host a node's keys live in RUN_DIR/keys/node-<rank>/ (0700, files 0600)."""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import tomllib

KEYS_SETTING = "security.keys_dir"
AUTHORIZED = "authorized"
"""The folder of public keys in a key set (as `gossipdqn keys generate` writes it)."""
KeyMaker = Callable[[Path, int], object]
"""Writes a key set for N nodes into a directory, as `gossipdqn keys generate` does."""


def keys_given(args: argparse.Namespace) -> bool:
    """Whether `--set` or a config file readable here names `security.keys_dir`."""
    if any(item.partition("=")[0].strip() == KEYS_SETTING for item in args.set):
        return True
    try:
        with open(args.config, "rb") as f:
            return bool(tomllib.load(f).get("security", {}).get("keys_dir"))
    except (TypeError, OSError, tomllib.TOMLDecodeError):
        return False


def node_keys_dir(run_dir: str, rank: int) -> str:
    """Where node `rank` finds its secret key and the run's public keys on its host."""
    return str(PurePosixPath(run_dir) / "keys" / f"node-{rank}")


def node_setting(run_dir: str, rank: int) -> str:
    """The `--set` that points node `rank` at its keys."""
    return f"--set={KEYS_SETTING}={json.dumps(node_keys_dir(run_dir, rank))}"


def install_script(directory: str, run_dir: str, ranks: Sequence[int]) -> str:
    """The remote shell line that replaces these nodes' key folders with the tar on stdin."""
    keys = shlex.quote(str(PurePosixPath(run_dir) / "keys"))
    mine = " ".join(f"node-{rank}" for rank in ranks)
    return (
        f"cd {shlex.quote(directory)} && umask 077 && mkdir -p {keys} && cd {keys} && "
        f"rm -rf {mine} && tar -xof -"
    )


def bundle(keys_dir: Path, ranks: Sequence[int]) -> bytes:
    """A tar of `node-<r>/`: node r's secret key and `authorized/`, every entry mode 0600."""

    def private(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
        return info

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for rank in ranks:
            secret = f"node-{rank}.key_secret"
            tar.add(keys_dir / secret, f"node-{rank}/{secret}", filter=private)
            for public in sorted((keys_dir / AUTHORIZED).iterdir()):
                tar.add(public, f"node-{rank}/{AUTHORIZED}/{public.name}", filter=private)
    return out.getvalue()


def hand_out(
    make_keys: KeyMaker,
    ranks_of: Mapping[str, list[int]],
    command: Callable[[str], list[str]],
    timeout_s: float,
) -> list[str]:
    """Make a fresh key set and send each ssh target its nodes' keys; what failed, per target.

    The local copy lives in a private temporary folder, removed before this returns."""
    with tempfile.TemporaryDirectory(prefix="gossipdqn-keys-") as local:
        keys_dir = Path(local) / "keys"
        make_keys(keys_dir, sum(len(r) for r in ranks_of.values()))

        def install(target: str) -> str | None:
            data = bundle(keys_dir, ranks_of[target])
            try:
                done = subprocess.run(
                    command(target), input=data, capture_output=True, timeout=timeout_s
                )
            except (subprocess.TimeoutExpired, OSError) as exc:
                return f"{target}: cannot install keys ({exc})"
            if done.returncode == 0:
                return None
            tail = done.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
            return f"{target}: key install failed (exit {done.returncode}): {tail[-1]}"

        with ThreadPoolExecutor(max_workers=min(32, len(ranks_of))) as pool:
            return [failure for failure in pool.map(install, ranks_of) if failure]
