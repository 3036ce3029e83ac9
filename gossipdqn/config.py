"""Every setting as a frozen dataclass, loaded from TOML with `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from gossipdqn.partition import parse_partition


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range; the message names the key."""


def setting(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A dataclass field with its documentation and the range it must lie in."""
    meta = {"doc": doc, "low": low, "high": high, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EnvConfig:
    id: str = setting("CartPole-v1", "gymnasium environment id")
    imports: tuple[str, ...] = setting(
        (), "modules imported on every node before the environment is made (they register ids)"
    )
    num_envs: int = setting(8, "environments stepped together by the node's actors", low=1)
    vectorization: str = setting(
        "sync",
        "how the environments are vectorized: in-process (sync) or one subprocess each (async)",
        choices=("sync", "async"),
    )
    max_episode_steps: int = setting(0, "episode step cap; 0 keeps the environment's own", low=0)
    episodic_life: bool = setting(
        True, "Atari: a lost life is terminal for the learner; the game goes on (eval: whole games)"
    )
    clip_rewards: bool = setting(
        True, "Atari: training rewards clipped to their sign (not in eval)"
    )
    noop_max: int = setting(30, "Atari: up to this many no-op steps after each reset", low=0)
    threads: int = setting(
        1, "Atari: native threads stepping one vector env; 0 is automatic", low=0
    )


@dataclass(frozen=True)
class ActorConfig:
    eps_start: float = setting(1.0, "initial exploration rate", low=0.0, high=1.0)
    eps_end: float = setting(0.04, "final exploration rate", low=0.0, high=1.0)
    eps_decay_steps: int = setting(8_000, "env steps over which epsilon decays linearly", low=1)
    ape_x: bool = setting(False, "per-actor fixed epsilons eps_i = eps^(1 + alpha*i/(N-1))")
    ape_x_eps: float = setting(0.4, "base epsilon of the Ape-X ladder", low=0.0, high=1.0)
    ape_x_alpha: float = setting(7.0, "exponent spread of the Ape-X ladder", low=0.0)
    processes: int = setting(
        0, "actor processes per node, each with env.num_envs envs; 0 steps envs in-process", low=0
    )
    inference: str = setting(
        "local",
        "where actor processes evaluate the policy: a CPU copy (local) or the learner's net",
        choices=("local", "learner"),
    )
    refresh_every: int = setting(
        100, "learner updates between policy broadcasts to actor processes", low=1
    )
    queue_steps: int = setting(
        4, "vector steps an actor process may have in flight before it blocks", low=1
    )
    restart_limit: int = setting(10, "restarts of crashed actor processes before giving up", low=0)


@dataclass(frozen=True)
class NetworkConfig:
    hidden: tuple[int, ...] = setting((128, 128), "hidden layer widths of the MLP Q-network")
    dueling: bool = setting(False, "dueling head: Q = V + A - mean(A)")
    kind: str = setting(
        "auto",
        "Q-network body; auto is nature_cnn for 84x84 frames, minatar_cnn for 10x10 grids",
        choices=("auto", "mlp", "nature_cnn", "minatar_cnn"),
    )


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = setting(100_000, "transitions kept in the ring buffer", low=1)
    n_step: int = setting(3, "steps summed into each stored return", low=1, high=100)
    prioritized: bool = setting(False, "proportional prioritized replay (sum tree)")
    alpha: float = setting(0.6, "priority exponent of prioritized replay", low=0.0, high=1.0)
    beta_start: float = setting(0.4, "initial importance-weight exponent", low=0.0, high=1.0)
    beta_steps: int = setting(50_000, "env steps over which beta anneals to 1", low=1)
    priority_eps: float = setting(1e-6, "added to |TD error| so no priority is zero", low=1e-12)
    storage: str = setting(
        "auto",
        "whole observations per transition, or each stacked frame once (auto: frames for Atari)",
        choices=("auto", "transitions", "frames"),
    )


@dataclass(frozen=True)
class LearnerConfig:
    device: str = setting("auto", "'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:N'")
    threads: int = setting(1, "torch CPU threads of the node; 0 keeps torch's default", low=0)
    lr: float = setting(2e-3, "Adam learning rate", low=0.0)
    lr_end: float = setting(0.0, "learning rate at the end of lr_decay_steps", low=0.0)
    lr_decay_steps: int = setting(0, "env steps of a linear fall to lr_end; 0 keeps lr", low=0)
    adam_eps: float = setting(1e-8, "Adam epsilon", low=0.0)
    gamma: float = setting(0.99, "discount factor", low=0.0, high=1.0)
    batch_size: int = setting(128, "minibatch size", low=1)
    learning_starts: int = setting(1_000, "env steps collected before the first update", low=0)
    updates_per_step: float = setting(
        0.25, "learner updates per env step (the replay ratio)", low=0.0
    )
    double: bool = setting(True, "Double DQN: the online net picks the next action")
    loss: str = setting("huber", "TD loss", choices=("huber", "mse"))
    max_grad_norm: float = setting(10.0, "gradient-norm clip; 0 disables", low=0.0)
    target_update: str = setting(
        "hard",
        "target network update: hard copy every C updates or Polyak",
        choices=("hard", "polyak"),
    )
    target_every: int = setting(50, "updates between hard target copies", low=1)
    tau: float = setting(0.005, "Polyak coefficient of the target update", low=0.0, high=1.0)
    prefetch: bool = setting(False, "sample and copy the next batch in a thread during an update")
    bf16: bool = setting(False, "bfloat16 autocast of the forward passes")
    compile: bool = setting(False, "torch.compile the TD loss computation")
    metrics_every: int = setting(
        1, "updates between host syncs for loss and mean Q (priorities sync every update)", low=1
    )


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int = setting(50_000, "env steps of the whole run", low=1)
    stop_at_threshold: bool = setting(False, "end the run when the threshold is reached")
    progress_every_s: float = setting(
        2.0, "seconds between progress lines and metric flushes", low=0.1
    )
    log_every_steps: int = setting(1_000, "env steps between metric records", low=1)


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = setting(2_000, "env steps between greedy evaluations; 0 disables", low=0)
    episodes: int = setting(10, "episodes of each periodic evaluation", low=1)
    final_episodes: int = setting(20, "episodes of the final evaluation", low=1)
    threshold: float = setting(475.0, "mean return that counts as solved")
    consecutive: int = setting(
        2,
        "periodic evaluations in a row that must meet the threshold to count as reaching it",
        low=1,
    )
    eps: float = setting(0.0, "epsilon of the evaluation policy", low=0.0, high=1.0)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = setting(10_000, "env steps between checkpoints; 0 only at the end", low=0)
    replay: bool = setting(False, "include the replay memory in checkpoints")


@dataclass(frozen=True)
class GossipConfig:
    params: bool = setting(True, "mix parameters with peers")
    experience: bool = setting(True, "share experience with peers")
    interval: int = setting(20, "learner updates between parameter gossip rounds", low=1)
    topology: str = setting(
        "exponential",
        "who talks to whom each round",
        choices=("ring", "exponential", "random_regular", "complete"),
    )
    degree: int = setting(2, "out-peers per round of the random k-regular topology", low=1)
    mixing: str = setting("push_sum", "averaging rule", choices=("push_sum", "pairwise"))
    robust: str = setting(
        "none", "defence against outlying peers", choices=("none", "clip", "reject")
    )
    share_every: int = setting(500, "env steps between experience shares", low=1)
    share_batch: int = setting(256, "transitions in each experience share", low=1)
    share_fanout: int = setting(1, "peers each experience share goes to", low=1)
    max_bytes_per_s: float = setting(50e6, "outbound byte budget per peer; 0 is unlimited", low=0.0)
    peer_timeout_s: float = setting(5.0, "silence after which a peer is marked dead", low=0.1)
    heartbeat_s: float = setting(1.0, "seconds between hello messages to each peer", low=0.01)
    rendezvous_s: float = setting(60.0, "at start, most seconds to wait to hear every peer (or "
                                  "one already training); 0 trains at once", low=0.0)  # fmt: skip
    queue_messages: int = setting(
        8, "outbound messages queued per peer before the oldest drops", low=1
    )
    max_message_mb: float = setting(64.0, "cap on an inbound frame and message, in MiB; a gossip "
                                    "node derives tighter bounds from its own model and env "
                                    "(docs/security.md)", low=0.001)  # fmt: skip


@dataclass(frozen=True)
class SecurityConfig:
    keys_dir: str = setting("", "directory from `gossipdqn keys generate`; empty disables CURVE")
    insecure: bool = setting(
        False,
        "accept binding a non-loopback address without keys (unauthenticated, unencrypted; "
        "warned at start and in every progress line); without it such a node refuses to start",
    )


@dataclass(frozen=True)
class FaultsConfig:
    drop_prob: float = setting(
        0.0, "probability that an outbound message is dropped", low=0.0, high=1.0
    )
    delay_ms: float = setting(0.0, "delay added to every outbound message", low=0.0)
    partition: tuple[str, ...] = setting(
        (), "cuts 'START-END:a,b|c,d': between seconds START and END groups cannot talk"
    )


@dataclass(frozen=True)
class Config:
    name: str = setting("cartpole", "run name, used in the default run directory")
    seed: int = setting(0, "seed of environments, networks and sampling", low=0)
    env: EnvConfig = field(default_factory=EnvConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{key}: expected a value >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: expected a value <= {high}, got {value!r}")


def _build(cls: type, data: typing.Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting in {where}; expected one of: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in data.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table of settings, got {value!r}")
            kwargs[name] = _build(tp, value, key + ".")
            continue
        kwargs[name] = _coerce(key, value, tp)
        _check_range(key, kwargs[name], fields[name].metadata)
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    if cfg.actor.eps_end > cfg.actor.eps_start:
        raise ConfigError("actor.eps_end: expected a value <= actor.eps_start")
    if cfg.learner.batch_size > cfg.replay.capacity:
        raise ConfigError("learner.batch_size: expected a value <= replay.capacity")
    if not (
        cfg.learner.device in ("auto", "cpu", "cuda") or cfg.learner.device.startswith("cuda:")
    ):
        raise ConfigError(
            f"learner.device: expected auto, cpu, cuda or cuda:N, got {cfg.learner.device!r}"
        )
    for entry in cfg.faults.partition:
        try:
            parse_partition(entry)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into a key path and a TOML value (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def merge_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `value` at `path` inside nested dicts, creating tables as needed."""
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is a value, not a section")
    node[path[-1]] = value


def config_from_dict(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a Config from parsed TOML plus `section.key=value` overrides."""
    data = _deep_copy(data)
    for text in overrides:
        merge_override(data, *parse_override(text))
    cfg = _build(Config, data, "")
    _check_consistency(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML file (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; expected a TOML file")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return config_from_dict(data, overrides)


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (tuples as lists), ready for TOML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_to_toml(cfg: Config) -> str:
    """Serialize the resolved config as TOML that `load_config` reads back to an equal Config."""
    top, tables = [], []
    for key, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            lines = [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            tables.append(f"[{key}]\n" + "\n".join(lines))
        else:
            top.append(f"{key} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"

