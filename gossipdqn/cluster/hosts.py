"""Who runs which rank where: hosts files, inline host lists, Slurm and torchrun variables.

Pure parsing: nothing here starts a process or opens a socket; the only I/O is reading a hosts
file. Every error is a `HostsError` that names its source, the line and what is expected.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import NamedTuple

DEFAULT_PORT = 47000
MAX_PORT = 65535
_KEYS = ("slots", "port", "iface", "device")
_EXPECTED_LINE = "[user@]host [slots=N] [port=P] [iface=NAME] [device=DEV]"
_TARGET_RE = re.compile(r"(?:([A-Za-z0-9_][A-Za-z0-9._-]*)@)?([A-Za-z0-9][A-Za-z0-9._-]*)")
_IFACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_DEVICE_RE = re.compile(r"[a-z]+(?::\d+)?")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class HostsError(ValueError):
    """A host list that cannot be used; the message says where and what is expected."""


@dataclass(frozen=True)
class HostSpec:
    """One host entry: start `slots` nodes on `host`, the first listening on `port`."""

    host: str
    slots: int = 1
    user: str | None = None
    port: int | None = None
    iface: str | None = None
    device: str | None = None
    line: int = 0

    @property
    def target(self) -> str:
        """The ssh destination, `[user@]host`."""
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass(frozen=True)
class NodeAddress:
    """One node of a run: its rank, the address its peers reach it at, its host entry."""

    rank: int
    host: str
    port: int
    device: str | None
    slot: int
    spec: HostSpec

    @property
    def peer(self) -> str:
        """The `host:port` form used in peer lists."""
        return f"{self.host}:{self.port}"

    @property
    def bind(self) -> str:
        """Where to listen: the host's interface if named, its address if it is one, else all."""
        if self.spec.iface:
            return self.spec.iface
        numeric = self.host.replace(".", "").isdigit() or ":" in self.host
        return self.host if numeric else "0.0.0.0"


class World(NamedTuple):
    """This process's rank, the world size and every node's `host:port`, in rank order."""

    rank: int
    size: int
    peers: tuple[str, ...]


def parse_hosts_file(path: str | Path) -> list[HostSpec]:
    """Read a DeepSpeed / Open MPI style hosts file; the order of lines fixes the ranks."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HostsError(f"hosts file '{path}': cannot read it ({exc})") from exc
    hosts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split("#", 1)[0].split()
        if tokens:
            hosts.append(_parse_line(tokens, number, f"hosts file '{path}', line {number}"))
    if not hosts:
        raise HostsError(
            f"hosts file '{path}': no hosts in it; expected one host a line, {_EXPECTED_LINE}"
        )
    _check_unique(hosts, f"hosts file '{path}'", "line")
    return hosts


def load_hosts(value: str) -> list[HostSpec]:
    """`--hosts`: a hosts file path, or an inline list like `a:2,b:2`."""
    if Path(value).is_file():
        return parse_hosts_file(value)
    if ":" in value or "," in value:
        return parse_hosts_inline(value)
    raise HostsError(
        f"--hosts '{value}': no such hosts file; expected a file, or an inline list such as "
        f"{value}:1"
    )


def parse_hosts_inline(text: str) -> list[HostSpec]:
    """Parse `--hosts a:2,b:2,alice@c` (host[:slots], comma separated)."""
    entries = text.split(",")
    hosts = []
    for number, entry in enumerate(entries, start=1):
        where = f"--hosts '{text}', entry {number}"
        name, sep, slots = entry.strip().partition(":")
        tokens = [name] + ([f"slots={slots}"] if sep else [])
        if not name:
            raise HostsError(f"{where}: empty entry; expected host[:slots], e.g. node-a:2")
        hosts.append(_parse_line(tokens, number, where))
    _check_unique(hosts, f"--hosts '{text}'", "entry")
    return hosts


def _parse_line(tokens: list[str], number: int, where: str) -> HostSpec:
    """Turn the tokens of one entry into a HostSpec."""
    match = _TARGET_RE.fullmatch(tokens[0])
    if match is None:
        raise HostsError(f"{where}: bad host '{tokens[0]}'; expected {_EXPECTED_LINE}")
    values: dict[str, str] = {}
    for token in tokens[1:]:
        key, sep, value = token.partition("=")
        if not sep:
            raise HostsError(f"{where}: expected key=value ({', '.join(_KEYS)}), got '{token}'")
        if key not in _KEYS:
            raise HostsError(f"{where}: unknown key '{key}'; expected one of {', '.join(_KEYS)}")
        if key in values:
            raise HostsError(f"{where}: key '{key}' given twice; expected it at most once")
        values[key] = value
    spec = HostSpec(
        host=match.group(2),
        user=match.group(1),
        slots=_number(values.get("slots", "1"), "slots", where, 1),
        port=_number(values["port"], "port", where, 1) if "port" in values else None,
        iface=_word(values.get("iface"), "iface", _IFACE_RE, where),
        device=_word(values.get("device"), "device", _DEVICE_RE, where),
        line=number,
    )
    if spec.port is not None and spec.port + spec.slots - 1 > MAX_PORT:
        raise HostsError(
            f"{where}: ports {spec.port}..{spec.port + spec.slots - 1} run past {MAX_PORT}; "
            f"expected port + slots - 1 <= {MAX_PORT}"
        )
    return spec


def _number(value: str, key: str, where: str, low: int) -> int:
    """A whole number in [low, MAX_PORT], or a HostsError naming the key."""
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= MAX_PORT:
        raise HostsError(
            f"{where}: bad number '{value}' for {key}; expected a whole number "
            f"from {low} to {MAX_PORT}"
        )
    return int(value)


def _word(value: str | None, key: str, pattern: re.Pattern[str], where: str) -> str | None:
    """A name matching `pattern`, or a HostsError naming the key."""
    if value is not None and pattern.fullmatch(value) is None:
        example = "eth0" if key == "iface" else "cuda:1"
        raise HostsError(f"{where}: bad value '{value}' for {key}; expected a name like {example}")
    return value


def _check_unique(hosts: Sequence[HostSpec], source: str, unit: str) -> None:
    """Reject a host listed twice unless both entries give disjoint port ranges."""
    seen: dict[str, HostSpec] = {}
    for spec in hosts:
        first = seen.setdefault(spec.host, spec)
        if first is spec:
            continue
        if first.port is None or spec.port is None:
            raise HostsError(
                f"{source}, {unit} {spec.line}: duplicate host '{spec.host}' (also on {unit} "
                f"{first.line}); "
                "expected each host once (use slots=N), or a distinct port= on every entry"
            )
        if spec.port < first.port + first.slots and first.port < spec.port + spec.slots:
            raise HostsError(
                f"{source}, {unit} {spec.line}: port range collision on '{spec.host}': ports "
                f"{_span(spec)} overlap ports {_span(first)} ({unit} {first.line}); "
                "expected disjoint [port, port+slots) ranges"
            )
        seen[spec.host] = spec


def _span(spec: HostSpec) -> str:
    """The ports of an entry that gives port=, as `first..last`."""
    assert spec.port is not None
    return f"{spec.port}..{spec.port + spec.slots - 1}"


def select_hosts(
    hosts: Sequence[HostSpec], include: str | None = None, exclude: str | None = None
) -> list[HostSpec]:
    """Keep the hosts named in `include` or drop those in `exclude` (comma separated names)."""
    if include and exclude:
        raise HostsError("--include and --exclude: give one of them, not both")
    names = {spec.host for spec in hosts} | {spec.target for spec in hosts}
    chosen = [name.strip() for name in (include or exclude or "").split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names]
    if unknown:
        flag = "--include" if include else "--exclude"
        raise HostsError(
            f"{flag}: unknown host {', '.join(map(repr, unknown))}; expected names from the "
            f"host list ({', '.join(spec.target for spec in hosts)})"
        )
    if not chosen:
        return list(hosts)
    wanted = set(chosen)
    kept = [s for s in hosts if (s.host in wanted or s.target in wanted) == bool(include)]
    if not kept:
        raise HostsError("--exclude: every host is excluded; expected at least one to remain")
    return kept


def node_addresses(
    hosts: Sequence[HostSpec], default_port: int = DEFAULT_PORT
) -> list[NodeAddress]:
    """Every node in rank order; node k of a host listens on the host's base port + k."""
    nodes = []
    for spec in hosts:
        base = default_port if spec.port is None else spec.port
        for slot in range(spec.slots):
            nodes.append(NodeAddress(len(nodes), spec.host, base + slot, spec.device, slot, spec))
    return nodes


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(nodes: Sequence[NodeAddress]) -> None:
    """Refuse a run mixing loopback addresses with hosts that could not reach them."""
    local = [node for node in nodes if is_loopback(node.host)]
    remote = [node for node in nodes if not is_loopback(node.host)]
    if local and remote:
        raise HostsError(
            f"host '{local[0].spec.target}' (line {local[0].spec.line}) would advertise "
            f"{local[0].host}, which nodes on '{remote[0].host}' cannot reach; expected the "
            "host's name or address as its peers see it"
        )


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. `node[01-02,07],gpu-a[1-2]`."""
    if not nodelist.strip():
        raise HostsError("SLURM node list is empty; expected names like node[01-04,07]")
    return [name for part in _split_top(nodelist) for name in _expand_pattern(part, nodelist)]


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise HostsError(f"SLURM node list '{text}': unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth:
        raise HostsError(f"SLURM node list '{text}': unbalanced brackets")
    return parts + [text[start:]]


def _expand_pattern(pattern: str, whole: str) -> list[str]:
    """Expand one name that may hold several bracket groups (cartesian product)."""
    pieces = re.split(r"\[([^\]]*)\]", pattern)
    if not pattern or not all(re.fullmatch(r"[A-Za-z0-9._-]*", p) for p in pieces[::2]):
        raise HostsError(f"SLURM node list '{whole}': bad name '{pattern}'")
    choices = [
        [piece] if index % 2 == 0 else _expand_range(piece, whole)
        for index, piece in enumerate(pieces)
    ]
    return ["".join(names) for names in product(*choices)]


def _expand_range(body: str, whole: str) -> list[str]:
    """`01-04,07` -> ['01', '02', '03', '04', '07'], keeping the zero padding."""
    names = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None or int(match.group(2) or match.group(1)) < int(match.group(1)):
            raise HostsError(
                f"SLURM node list '{whole}': bad range '{item}'; expected N or N-M with N <= M"
            )
        low, high = match.group(1), match.group(2) or match.group(1)
        names += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return names


def parse_tasks_per_node(text: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE, e.g. `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise HostsError(f"SLURM_TASKS_PER_NODE '{text}': expected a form like 2(x3),1")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _env_int(env: Mapping[str, str], name: str, hint: str) -> int:
    """A whole-number environment variable, or a HostsError saying how to set it."""
    value = env.get(name)
    if value is None or not value.isdigit():
        raise HostsError(f"{name} is {'not set' if value is None else repr(value)}; {hint}")
    return int(value)


def slurm_nodelist(env: Mapping[str, str]) -> str | None:
    """The compressed node list of this job step (or of the job), if any."""
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            return env[name]
    return None


def slurm_world(
    env: Mapping[str, str],
    default_port: int = DEFAULT_PORT,
    hostnames: Sequence[str] | None = None,
) -> World:
    """Rank, world size and peers of a task started by `srun` (block distribution)."""
    hint = "expected to run inside `srun` in a Slurm allocation"
    rank = _env_int(env, "SLURM_PROCID", hint)
    tasks_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    size = _env_int(env, tasks_name, hint)
    nodelist = slurm_nodelist(env)
    if hostnames is None:
        if nodelist is None:
            raise HostsError(f"SLURM_JOB_NODELIST is not set; {hint}")
        hostnames = expand_slurm_nodelist(nodelist)
    tasks_text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if tasks_text is not None:
        tasks = parse_tasks_per_node(tasks_text)
    elif size % len(hostnames) == 0:
        tasks = [size // len(hostnames)] * len(hostnames)
    else:
        raise HostsError(f"SLURM_TASKS_PER_NODE is not set and {size} tasks do not divide evenly")
    if len(tasks) != len(hostnames) or sum(tasks) != size:
        raise HostsError(
            f"Slurm variables disagree: {len(hostnames)} hosts, tasks per node {tasks}, "
            f"{size} tasks; expected one count per host summing to the number of tasks"
        )
    nodes = node_addresses([HostSpec(h, n) for h, n in zip(hostnames, tasks)], default_port)
    _check_slurm_placement(env, rank, nodes)
    return World(rank, size, tuple(node.peer for node in nodes))


def _check_slurm_placement(env: Mapping[str, str], rank: int, nodes: list[NodeAddress]) -> None:
    """Make sure this task sits where the block-distributed peer list says it does."""
    if not 0 <= rank < len(nodes):
        raise HostsError(f"SLURM_PROCID {rank} is outside 0..{len(nodes) - 1}")
    node = nodes[rank]
    where = env.get("SLURMD_NODENAME", node.host)
    local = env.get("SLURM_LOCALID", str(node.slot))
    if where != node.host or local != str(node.slot):
        raise HostsError(
            f"Slurm task {rank} runs on {where} (local id {local}) but block order puts it on "
            f"{node.host} (local id {node.slot}); expected `srun --distribution=block`"
        )


def torchrun_world(
    env: Mapping[str, str], hosts: Sequence[HostSpec], default_port: int = DEFAULT_PORT
) -> World:
    """Rank from torchrun-style RANK / WORLD_SIZE, peers from a hosts list (no MASTER_ADDR)."""
    hint = "expected RANK and WORLD_SIZE set by the process starter (torchrun style)"
    rank = _env_int(env, "RANK", hint)
    size = _env_int(env, "WORLD_SIZE", hint)
    peers = tuple(node.peer for node in node_addresses(hosts, default_port))
    if size != len(peers):
        raise HostsError(
            f"WORLD_SIZE is {size} but the hosts list has {len(peers)} nodes; expected them equal"
        )
    if rank >= size:
        raise HostsError(f"RANK {rank} is outside 0..{size - 1}")
    return World(rank, size, peers)
