"""CURVE keys: generation, loading, the rank map, and the refusal to run exposed without keys."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from gossipdqn.config import SecurityConfig
from gossipdqn.net.keys import (
    SecurityError,
    authorized_public_keys,
    curve_keys_for,
    generate_keys,
    is_loopback,
    load_curve_keys,
    load_node_keys,
)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_keys(directory, 3)
    return directory


def test_generate_writes_pairs_and_authorized_copies(key_dir: Path) -> None:
    for rank in range(3):
        secret = key_dir / f"node-{rank}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert (key_dir / f"node-{rank}.key").is_file()
        assert (key_dir / "authorized" / f"node-{rank}.key").is_file()


def test_rank_map_matches_each_node_pair(key_dir: Path) -> None:
    ranks = authorized_public_keys(key_dir)
    assert sorted(ranks.values()) == [0, 1, 2]
    for rank in range(3):
        keys = load_node_keys(key_dir, rank)
        assert len(keys.public) == 40 and len(keys.secret) == 40
        assert ranks[keys.public] == rank


def test_load_curve_keys_bundles_peer_server_keys(key_dir: Path) -> None:
    curve = load_curve_keys(key_dir, 1, [0, 2])
    assert curve.node == load_node_keys(key_dir, 1)
    assert curve.server_keys == {0: load_node_keys(key_dir, 0).public, 2: curve.server_keys[2]}
    assert curve.ranks[curve.server_keys[2]] == 2
    assert curve.authorized_dir == key_dir / "authorized"


def test_clear_errors_for_missing_files(tmp_path: Path, key_dir: Path) -> None:
    with pytest.raises(SecurityError, match="node-7.key_secret: key file not found"):
        load_node_keys(key_dir, 7)
    with pytest.raises(SecurityError, match="public key of peer 5 not found"):
        load_curve_keys(key_dir, 0, [1, 5])
    with pytest.raises(SecurityError, match="authorized public keys not found"):
        authorized_public_keys(tmp_path)
    with pytest.raises(ValueError, match="at least 1"):
        generate_keys(tmp_path, 0)


def test_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, 1)
    (tmp_path / "node-0.key_secret").chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_node_keys(tmp_path, 0)


def test_unexpected_authorized_file_is_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, 1)
    (tmp_path / "authorized" / "alice.key").write_text("x")
    with pytest.raises(SecurityError, match="expected node-<rank>.key"):
        authorized_public_keys(tmp_path)


def test_malformed_key_file_is_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, 1)
    (tmp_path / "node-0.key_secret").write_text("not a certificate\n")
    with pytest.raises(SecurityError, match="no secret key|not a ZeroMQ certificate"):
        load_node_keys(tmp_path, 0)


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("tcp://127.0.0.1:5000", True),
        ("tcp://127.3.0.1:5000", True),
        ("tcp://localhost:5000", True),
        ("tcp://[::1]:5000", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5000", False),
        ("tcp://*:5000", False),
        ("tcp://10.0.0.7:5000", False),
        ("tcp://eth0:5000", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_curve_keys_for_follows_the_settings(
    key_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert curve_keys_for(SecurityConfig(), 0, "tcp://127.0.0.1:5000", [1]) is None
    keys = curve_keys_for(SecurityConfig(keys_dir=str(key_dir)), 0, "tcp://0.0.0.0:1", [1, 2])
    assert keys is not None and set(keys.server_keys) == {1, 2}
    with pytest.raises(SecurityError, match="refusing to bind tcp://0.0.0.0:5000.*insecure=true"):
        curve_keys_for(SecurityConfig(), 0, "tcp://0.0.0.0:5000", [1])
    assert "INSECURE" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="gossipdqn.net.keys"):
        insecure = SecurityConfig(insecure=True)
        assert curve_keys_for(insecure, 0, "tcp://0.0.0.0:5000", [1]) is None
    assert "INSECURE" in caplog.text and "unauthenticated" in caplog.text
