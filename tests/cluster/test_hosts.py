"""Hosts files, inline lists, include/exclude, addresses, Slurm and torchrun variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossipdqn.cluster.hosts import (
    DEFAULT_PORT,
    HostsError,
    HostSpec,
    World,
    check_reachable,
    expand_slurm_nodelist,
    load_hosts,
    node_addresses,
    parse_hosts_file,
    parse_hosts_inline,
    parse_tasks_per_node,
    select_hosts,
    slurm_world,
    torchrun_world,
)

GOOD_FILE = """\
# host           nodes on it   optional
node-a           slots=2

node-b   slots=2 port=47100 iface=eth0   # trailing comment
alice@10.0.0.7   slots=1       device=cuda:1
\tgpu.example.org device=cpu
"""


def write(tmp_path: Path, text: str) -> Path:
    """A hosts file holding `text`."""
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_good_file_every_form(tmp_path: Path) -> None:
    assert parse_hosts_file(write(tmp_path, GOOD_FILE)) == [
        HostSpec("node-a", slots=2, line=2),
        HostSpec("node-b", slots=2, port=47100, iface="eth0", line=4),
        HostSpec("10.0.0.7", slots=1, user="alice", device="cuda:1", line=5),
        HostSpec("gpu.example.org", device="cpu", line=6),
    ]


def test_same_host_twice_with_disjoint_ports(tmp_path: Path) -> None:
    hosts = parse_hosts_file(write(tmp_path, "a slots=2 port=5000\na slots=2 port=5002\n"))
    assert [node.peer for node in node_addresses(hosts)] == ["a:5000", "a:5001", "a:5002", "a:5003"]


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("a slot=2\n", 1, "unknown key 'slot'; expected one of slots, port, iface, device"),
        ("a\nb max_slots=4\n", 2, "unknown key 'max_slots'"),
        ("a slots=two\n", 1, "bad number 'two' for slots; expected a whole number from 1"),
        ("a slots=0\n", 1, "bad number '0' for slots"),
        ("a slots=-1\n", 1, "bad number '-1' for slots"),
        ("a slots=\n", 1, "bad number '' for slots"),
        ("a slots=2.0\n", 1, "bad number '2.0' for slots"),
        ("a port=70000\n", 1, "bad number '70000' for port; expected a whole number from 1 to"),
        ("a port=0\n", 1, "bad number '0' for port"),
        ("a slots=4 port=65533\n", 1, "ports 65533..65536 run past 65535"),
        ("a 2\n", 1, "expected key=value (slots, port, iface, device), got '2'"),
        ("a slots=1 slots=2\n", 1, "key 'slots' given twice"),
        ("-oProxyCommand=x\n", 1, "bad host '-oProxyCommand=x'; expected [user@]host"),
        ("@a\n", 1, "bad host '@a'"),
        ("a iface=e$h0\n", 1, "bad value 'e$h0' for iface; expected a name like eth0"),
        ("a device=CUDA\n", 1, "bad value 'CUDA' for device; expected a name like cuda:1"),
        ("a\n# c\nb\na slots=2\n", 4, "duplicate host 'a' (also on line 1)"),
        ("a port=5000\nbob@a port=6000 slots=2\nc\nalice@a port=6001\n", 4,
         "port range collision on 'a': ports 6001..6001 overlap ports 6000..6001 (line 2)"),
    ],
)  # fmt: skip
def test_bad_file_names_file_line_and_expectation(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(HostsError) as caught:
        parse_hosts_file(path)
    assert f"hosts file '{path}', line {line}: " in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   \n# another\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(HostsError, match=rf"hosts file '{path}': no hosts in it; expected one"):
        parse_hosts_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HostsError, match="cannot read it"):
        parse_hosts_file(tmp_path / "nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a:2,b:2", [HostSpec("a", 2, line=1), HostSpec("b", 2, line=2)]),
        ("a", [HostSpec("a", line=1)]),
        (" bob@a:3 , b ", [HostSpec("a", 3, user="bob", line=1), HostSpec("b", line=2)]),
        ("10.0.0.1:1,10.0.0.2:4", [HostSpec("10.0.0.1", line=1), HostSpec("10.0.0.2", 4, line=2)]),
    ],
)
def test_inline_good(text: str, expected: list[HostSpec]) -> None:
    assert parse_hosts_inline(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a:2,,b", "--hosts 'a:2,,b', entry 2: empty entry; expected host[:slots]"),
        ("a:x", "--hosts 'a:x', entry 1: bad number 'x' for slots"),
        ("a:0", "entry 1: bad number '0' for slots"),
        ("a:2,b:1,a:1", "--hosts 'a:2,b:1,a:1', entry 3: duplicate host 'a' (also on entry 1)"),
        ("a:1:2", "bad number '1:2' for slots"),
        (":2", "entry 1: empty entry"),
    ],
)
def test_inline_bad(text: str, expected: str) -> None:
    with pytest.raises(HostsError) as caught:
        parse_hosts_inline(text)
    assert expected in str(caught.value)


def test_load_hosts_file_inline_or_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "x slots=3\n")
    assert load_hosts(str(path)) == [HostSpec("x", 3, line=1)]
    assert load_hosts("x:3") == [HostSpec("x", 3, line=1)]
    with pytest.raises(HostsError, match="'hosts.txt': no such hosts file; expected a file, or"):
        load_hosts("hosts.txt")


def test_node_addresses_rank_order_ports_devices() -> None:
    hosts = [HostSpec("a", 2), HostSpec("b", 1, port=5000, device="cuda:1"), HostSpec("c", 2)]
    nodes = node_addresses(hosts, default_port=6000)
    assert [(n.rank, n.peer, n.device, n.slot) for n in nodes] == [
        (0, "a:6000", None, 0),
        (1, "a:6001", None, 1),
        (2, "b:5000", "cuda:1", 0),
        (3, "c:6000", None, 0),
        (4, "c:6001", None, 1),
    ]
    assert node_addresses([HostSpec("a")])[0].port == DEFAULT_PORT == 47000


@pytest.mark.parametrize(
    ("spec", "bind"),
    [
        (HostSpec("10.0.0.7"), "10.0.0.7"),
        (HostSpec("127.0.0.2"), "127.0.0.2"),
        (HostSpec("node-a"), "0.0.0.0"),
        (HostSpec("node-a", iface="eth1"), "eth1"),
        (HostSpec("10.0.0.7", iface="ib0"), "ib0"),
    ],
)
def test_bind_address(spec: HostSpec, bind: str) -> None:
    assert node_addresses([spec])[0].bind == bind


HOSTS = [HostSpec("a", 2), HostSpec("b", user="bob"), HostSpec("c")]


@pytest.mark.parametrize(
    ("include", "exclude", "kept"),
    [
        (None, None, ["a", "b", "c"]),
        ("a,c", None, ["a", "c"]),
        ("c,a", None, ["a", "c"]),
        ("bob@b", None, ["b"]),
        (None, "b", ["a", "c"]),
        (None, " a , c ", ["b"]),
    ],
)
def test_select_hosts(include: str | None, exclude: str | None, kept: list[str]) -> None:
    assert [spec.host for spec in select_hosts(HOSTS, include, exclude)] == kept


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("a", "b", "give one of them, not both"),
        ("a,zz", None, "--include: unknown host 'zz'; expected names from the host list (a, bob@b"),
        (None, "zz", "--exclude: unknown host 'zz'"),
        (None, "a,b,c", "every host is excluded"),
    ],
)
def test_select_hosts_errors(include: str | None, exclude: str | None, expected: str) -> None:
    with pytest.raises(HostsError) as caught:
        select_hosts(HOSTS, include, exclude)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("names", "refused"),
    [
        (["127.0.0.1", "127.0.0.2"], False),
        (["localhost"], False),
        (["a", "b"], False),
        (["10.0.0.1", "127.0.0.1"], True),
        (["node-a", "localhost"], True),
        (["::1", "node-a"], True),
    ],
)
def test_loopback_refused_only_when_mixed(names: list[str], refused: bool) -> None:
    nodes = node_addresses([HostSpec(name, line=i + 1) for i, name in enumerate(names)])
    if refused:
        with pytest.raises(HostsError, match="cannot reach; expected the host's name or address"):
            check_reachable(nodes)
    else:
        check_reachable(nodes)


@pytest.mark.parametrize(
    ("nodelist", "expected"),
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("node[01-04,07],gpu-a[1-2]", ["node01", "node02", "node03", "node04", "node07",
                                       "gpu-a1", "gpu-a2"]),
        ("a,b[8-11],c", ["a", "b8", "b9", "b10", "b11", "c"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
        ("x[5]", ["x5"]),
        ("login.cluster[1-2].org", ["login.cluster1.org", "login.cluster2.org"]),
    ],
)  # fmt: skip
def test_expand_slurm_nodelist(nodelist: str, expected: list[str]) -> None:
    assert expand_slurm_nodelist(nodelist) == expected


@pytest.mark.parametrize(
    "nodelist", ["", "node[1-2", "node1-2]", "node[2-1]", "node[a-b]", "n[[1]]", "a,,b", "n[1-]"]
)
def test_expand_slurm_nodelist_errors(nodelist: str) -> None:
    with pytest.raises(HostsError, match="SLURM node list"):
        expand_slurm_nodelist(nodelist)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,2(x2)", [1, 2, 2]), ("3(x1)", [3])],
)
def test_tasks_per_node(text: str, expected: list[int]) -> None:
    assert parse_tasks_per_node(text) == expected


def test_tasks_per_node_error() -> None:
    with pytest.raises(HostsError, match="expected a form like 2\\(x3\\),1"):
        parse_tasks_per_node("2x3")


def slurm_env(rank: int, **extra: str) -> dict[str, str]:
    """A synthetic environment of task `rank` in a 5-task step on n[1-3] (2, 2, 1 tasks)."""
    placement = [("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1), ("n3", 0)]
    host, local = placement[rank]
    env = {
        "SLURM_PROCID": str(rank), "SLURM_NTASKS": "5", "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURMD_NODENAME": host, "SLURM_LOCALID": str(local),
    }  # fmt: skip
    return env | extra


SLURM_PEERS = ("n1:47000", "n1:47001", "n2:47000", "n2:47001", "n3:47000")


@pytest.mark.parametrize("rank", range(5))
def test_slurm_world_every_rank(rank: int) -> None:
    assert slurm_world(slurm_env(rank)) == World(rank, 5, SLURM_PEERS)


def test_slurm_world_step_variables_win_and_port() -> None:
    env = slurm_env(1, SLURM_STEP_NODELIST="n[1-2]", SLURM_STEP_TASKS_PER_NODE="2,1",
                    SLURM_STEP_NUM_TASKS="3")  # fmt: skip
    assert slurm_world(env, default_port=100) == World(1, 3, ("n1:100", "n1:101", "n2:100"))


def test_slurm_world_given_hostnames_and_even_split() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "ignored[1-2]"}
    world = slurm_world(env, 9000, hostnames=["x", "y"])
    assert world == World(3, 4, ("x:9000", "x:9001", "y:9000", "y:9001"))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "SLURM_PROCID is not set; expected to run inside `srun`"),
        ({"SLURM_PROCID": "0"}, "SLURM_NTASKS is not set"),
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "1"}, "SLURM_PROCID is 'x'"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, "SLURM_JOB_NODELIST is not set"),
        (slurm_env(0, SLURM_NTASKS="6"), "Slurm variables disagree: 3 hosts"),
        (slurm_env(0, SLURM_TASKS_PER_NODE="2,2"), "Slurm variables disagree"),
        (slurm_env(1, SLURMD_NODENAME="n2"), "expected `srun --distribution=block`"),
        (slurm_env(1, SLURM_LOCALID="0"), "runs on n1 (local id 0) but block order"),
        (slurm_env(0, SLURM_PROCID="5"), "SLURM_PROCID 5 is outside 0..4"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_NODELIST": "a,b"}, "do not divide"),
    ],
)
def test_slurm_world_errors(env: dict[str, str], expected: str) -> None:
    with pytest.raises(HostsError) as caught:
        slurm_world(env)
    assert expected in str(caught.value)


def test_torchrun_world() -> None:
    hosts = [HostSpec("a", 2), HostSpec("b", port=5000)]
    assert torchrun_world({"RANK": "2", "WORLD_SIZE": "3"}, hosts) == World(
        2, 3, ("a:47000", "a:47001", "b:5000")
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORLD_SIZE": "3"}, "RANK is not set; expected RANK and WORLD_SIZE"),
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"RANK": "0", "WORLD_SIZE": "4"}, "WORLD_SIZE is 4 but the hosts list has 3 nodes"),
        ({"RANK": "3", "WORLD_SIZE": "3"}, "RANK 3 is outside 0..2"),
    ],
)
def test_torchrun_world_errors(env: dict[str, str], expected: str) -> None:
    with pytest.raises(HostsError) as caught:
        torchrun_world(env, [HostSpec("a", 2), HostSpec("b")])
    assert expected in str(caught.value)
