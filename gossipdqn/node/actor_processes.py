"""Actor processes: each steps its own vector env and streams steps to the learner over ipc://.

The learner process binds three local sockets in a private temp directory: a PULL that takes
each actor's vector steps (the actor's PUSH blocks once `actor.queue_steps` are in flight, so a
learner that holds its replay ratio throttles the actors), an XPUB that broadcasts the policy
with a version every `actor.refresh_every` updates and again whenever an actor subscribes (so a
new or restarted actor waits for the learner's current policy before its first step, never
acting with weights of its own), and (with `actor.inference = "learner"`) a
ROUTER where a thread answers batched Q-value requests with the learner's own copy on its
device, as SEED RL does. Messages are `wire` frames, never pickles; a dead actor is restarted.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import zmq
from torch import nn

from gossipdqn.config import Config
from gossipdqn.dqn.actors import Actors
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.networks import build_q_network
from gossipdqn.net.wire import Kind, Message, WireLimits, decode, encode, tensors_from_state
from gossipdqn.types import EnvSpec, Transitions, VectorStep

RUN_ID = "actors"
LIMITS = WireLimits(max_total_bytes=1 << 30)
REPLY_TIMEOUT_MS = 30_000
"""How long an actor waits for a Q-value reply or its first policy before it gives up."""
SUBSCRIBE = 1
"""First byte of the message an XPUB socket receives when a subscriber joins."""
_TRANSITION_FIELDS = set(Transitions._fields)
_STEP_FIELDS = set(VectorStep._fields)


class Endpoints(NamedTuple):
    """The learner's ipc:// addresses."""

    steps: str
    policy: str
    inference: str


class Received(NamedTuple):
    """One vector step of one actor, as the learner takes it in."""

    actor: int
    stream: int
    seq: int
    version: int
    env_steps: int
    transitions: Transitions | None
    step: VectorStep | None
    episode_returns: np.ndarray
    epsilon: float
    """The actor's mean exploration rate in this step."""


def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.set_hwm(hwm)
    return sock


class _NodeSteps:
    """The node's env steps as an actor process counts them: the count its newest policy
    carried, plus `processes` times its own steps since (the node's other processes step alike),
    so epsilon decays over the node's steps, not P times slower over this process's own."""

    def __init__(self, processes: int) -> None:
        self.processes, self.policy, self.base, self.own = processes, (-1, 0), 0, 0

    def seen(self, version: int, env_steps: int) -> None:
        """Count from `env_steps` on when this (version, env steps) is new to the process."""
        if (version, env_steps) != self.policy:
            self.policy, self.base, self.own = (version, env_steps), env_steps, 0

    def count(self) -> int:
        return self.base + self.processes * self.own


class _LocalPolicy:
    """A CPU copy of the Q-network, replaced by the newest broadcast before each step."""

    def __init__(self, ctx: zmq.Context, endpoints: Endpoints, cfg: Config, spec: EnvSpec) -> None:
        self.net = build_q_network(spec, cfg.network).requires_grad_(False)
        self.sub = _socket(ctx, zmq.SUB, 2)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoints.policy)
        self.version, self.env_steps = -1, 0

    def refresh(self) -> None:
        """Load the newest policy; before the first one, wait for it."""
        if self.version < 0 and not self.sub.poll(REPLY_TIMEOUT_MS):
            raise TimeoutError(f"no policy from the learner within {REPLY_TIMEOUT_MS} ms")
        newest = None
        while self.sub.poll(0):
            newest = self.sub.recv_multipart(copy=False)
        if newest is not None:
            msg = decode(newest, LIMITS, run_id=RUN_ID)
            state = {k: torch.from_numpy(v.copy()) for k, v in msg.tensors.items()}
            self.net.load_state_dict(state)
            self.version, self.env_steps = msg.seq, int(msg.step)

    @torch.inference_mode()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        return self.net(torch.from_numpy(np.asarray(obs))).numpy()


class _RemotePolicy:
    """Q-values from the learner's inference thread, one request per vector step."""

    def __init__(self, ctx: zmq.Context, endpoints: Endpoints, index: int) -> None:
        self.sock = _socket(ctx, zmq.DEALER, 2)
        self.sock.connect(endpoints.inference)
        self.index, self.seq, self.version, self.env_steps = index, 0, -1, 0

    def refresh(self) -> None:
        """Nothing to do: the learner refreshes its own copy."""

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        self.seq += 1
        msg = Message(Kind.PULL, RUN_ID, self.index, self.seq, 0, {"obs": np.asarray(obs)})
        self.sock.send_multipart(encode(msg), copy=False)
        if not self.sock.poll(REPLY_TIMEOUT_MS):
            raise TimeoutError("the learner did not answer a Q-value request")
        reply = decode(self.sock.recv_multipart(copy=False), LIMITS, run_id=RUN_ID)
        self.version, self.env_steps = int(reply.meta["version"]), int(reply.step)
        return reply.tensors["q"]


def actor_main(
    cfg: Config, index: int, incarnation: int, endpoints: Endpoints, frames: bool,
    ladder: tuple[int, int],
) -> None:  # fmt: skip
    """An actor process: step the env, send each vector step, until the parent goes away.

    `ladder` is (index of its first env among all actors, all actors of all nodes).
    """
    torch.set_num_threads(1)
    parent = os.getppid()
    env = make_vector_env(cfg.env)
    seed = cfg.seed + 7919 * (index + 1) + 104_729 * incarnation
    actors = Actors(
        env, spec_of(env), cfg.actor, n_step=cfg.replay.n_step, gamma=cfg.learner.gamma,
        seed=seed, actor_offset=ladder[0], total_actors=ladder[1],
    )  # fmt: skip
    ctx = zmq.Context()
    push = _socket(ctx, zmq.PUSH, cfg.actor.queue_steps)
    push.connect(endpoints.steps)
    remote = cfg.actor.inference == "learner"
    policy = _RemotePolicy(ctx, endpoints, index) if remote else _LocalPolicy(
        ctx, endpoints, cfg, actors.spec
    )  # fmt: skip
    node_steps = _NodeSteps(cfg.actor.processes)
    seq = 0
    while os.getppid() == parent:
        policy.refresh()  # a broadcast policy arrives here, the learner's answers during a step
        node_steps.seen(policy.version, policy.env_steps)
        actors.steps = node_steps.count()
        epsilon = float(np.mean(actors.epsilon()))
        out = actors.step(policy.q_values)
        node_steps.seen(policy.version, policy.env_steps)
        node_steps.own += out.env_steps
        tensors = dict(out.step._asdict() if frames else out.transitions._asdict())
        tensors["episode_returns"] = out.episode_returns.astype(np.float64)
        meta = {"version": policy.version, "env_steps": out.env_steps, "incarnation": incarnation}
        meta["epsilon"] = epsilon
        frames_out = encode(
            Message(Kind.EXPERIENCE, RUN_ID, index, seq, actors.steps, tensors, meta)
        )
        while os.getppid() == parent and not push.poll(1000, zmq.POLLOUT):
            continue
        push.send_multipart(frames_out, copy=False)
        seq += 1


class InferenceServer:
    """A thread that answers actors' Q-value requests in batches with a copy of the online net."""

    def __init__(
        self, ctx: zmq.Context, address: str, net: nn.Module, device: torch.device
    ) -> None:
        self.net, self.device, self.version, self.env_steps = net, device, 0, 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.router = _socket(ctx, zmq.ROUTER, 1024)
        self.router.bind(address)
        self.thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.thread.start()

    def load(self, state: dict[str, torch.Tensor], version: int, env_steps: int) -> None:
        with self.lock:
            self.net.load_state_dict(state)
            self.version, self.env_steps = version, env_steps

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                if self.router.poll(50):
                    self._answer()
        finally:
            self.router.close()

    def _answer(self) -> None:
        """Take every pending request, run one forward pass, reply to each its rows."""
        who, arrays = [], []
        while self.router.poll(0) and len(who) < 256:
            identity, *frames = self.router.recv_multipart(copy=False)
            msg = decode(frames, LIMITS, run_id=RUN_ID)
            who.append((identity, msg.sender, msg.seq))
            arrays.append(msg.tensors["obs"])
        obs = torch.from_numpy(np.concatenate(arrays)).to(self.device, non_blocking=True)
        with self.lock, torch.inference_mode():
            q = self.net(obs).float().cpu().numpy()
            version, env_steps = self.version, self.env_steps
        bounds = np.cumsum([0] + [len(a) for a in arrays])
        for (identity, sender, seq), lo, hi in zip(who, bounds[:-1], bounds[1:]):
            meta = {"version": version}
            reply = Message(Kind.PULL, RUN_ID, sender, seq, env_steps, {"q": q[lo:hi]}, meta)
            self.router.send_multipart([identity, *encode(reply)], copy=False)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5.0)


class ActorPool:
    """`actor.processes` actor processes feeding this (learner) process; restarts the dead."""

    def __init__(
        self, cfg: Config, *, frames: bool, policy: nn.Module, device: torch.device,
        actor_offset: int = 0, total_actors: int | None = None,
    ) -> None:  # fmt: skip
        """`policy` is the learner's online net, read only when `publish` or `receive` run;
        this node's actors are `actor_offset ..` of `total_actors` (its own alone by default)."""
        self.cfg, self.frames, self.policy = cfg, frames, policy
        self.version, self.env_steps = 0, 0
        self.actor_offset = actor_offset
        self.total_actors = total_actors or cfg.actor.processes * cfg.env.num_envs
        self.epsilons = np.full(cfg.actor.processes, np.nan)
        """Each actor process's exploration rate in its latest step (NaN before its first)."""
        self.dir = Path(tempfile.mkdtemp(prefix="gdqn-"))
        base = f"ipc://{self.dir}"
        self.endpoints = Endpoints(f"{base}/steps", f"{base}/policy", f"{base}/inference")
        self.ctx = zmq.Context()
        self.pull = _socket(self.ctx, zmq.PULL, 4 * cfg.actor.processes * cfg.actor.queue_steps)
        self.pull.bind(self.endpoints.steps)
        self.pub = _socket(self.ctx, zmq.XPUB, 2)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only a topic's first
        self.pub.bind(self.endpoints.policy)
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.pub, zmq.POLLIN)
        self.server = (
            InferenceServer(
                self.ctx, self.endpoints.inference, copy.deepcopy(policy).requires_grad_(False),
                device,
            ) if cfg.actor.inference == "learner" else None
        )  # fmt: skip
        self.spawn = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess | None] = [None] * cfg.actor.processes
        self.incarnations = [0] * cfg.actor.processes
        self.restarts = 0
        for index in range(cfg.actor.processes):
            self._start(index)

    def _start(self, index: int) -> None:
        ladder = (self.actor_offset + index * self.cfg.env.num_envs, self.total_actors)
        args = (self.cfg, index, self.incarnations[index], self.endpoints, self.frames, ladder)
        proc = self.spawn.Process(target=actor_main, args=args, daemon=True, name=f"actor-{index}")
        proc.start()
        self.procs[index] = proc

    def stream_of(self, actor: int, incarnation: int) -> int:
        """A stream id per actor life, so a restarted actor's steps start a new frame stream."""
        return actor + len(self.procs) * incarnation

    def check(self) -> list[int]:
        """Restart every actor process that died; returns their indices."""
        dead = [i for i, p in enumerate(self.procs) if p is not None and p.exitcode is not None]
        for index in dead:
            if self.restarts >= self.cfg.actor.restart_limit:
                limit = self.cfg.actor.restart_limit
                raise RuntimeError(
                    f"actor {index} died (exit code {self.procs[index].exitcode}) after "
                    f"{self.restarts} restarts; actor.restart_limit is {limit}"
                )
            self.restarts += 1
            self.incarnations[index] += 1
            self._start(index)
        return dead

    def receive(self, timeout_s: float, max_messages: int = 64) -> list[Received]:
        """The vector steps that arrived, waiting up to `timeout_s` for the first.

        Actors that subscribed meanwhile get the current policy at once.
        """
        out: list[Received] = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(self.poller.poll(remaining_ms))
            if self.pub in events:
                self._answer_subscribers()
            if self.pull in events:
                break
            if not remaining_ms:
                return out
        while len(out) < max_messages and self.pull.poll(0):
            msg = decode(self.pull.recv_multipart(copy=False), LIMITS, run_id=RUN_ID)
            out.append(self._received(msg))
        return out

    def _received(self, msg: Message) -> Received:
        t = msg.tensors
        want = (_STEP_FIELDS if self.frames else _TRANSITION_FIELDS) | {"episode_returns"}
        if set(t) != want:
            raise ValueError(
                f"actor {msg.sender} sent tensors {sorted(t)}, expected {sorted(want)}"
            )
        step = VectorStep(*(t[k] for k in VectorStep._fields)) if self.frames else None
        transitions = None if self.frames else Transitions(*(t[k] for k in Transitions._fields))
        stream = self.stream_of(msg.sender, int(msg.meta["incarnation"]))
        epsilon = float(msg.meta["epsilon"])
        self.epsilons[msg.sender] = epsilon
        return Received(
            msg.sender, stream, msg.seq, int(msg.meta["version"]), int(msg.meta["env_steps"]),
            transitions, step, t["episode_returns"], epsilon,
        )  # fmt: skip

    def epsilon(self) -> float | None:
        """The actor processes' mean exploration rate in their latest steps; None before any."""
        reported = self.epsilons[~np.isnan(self.epsilons)]
        return float(reported.mean()) if len(reported) else None

    def publish(self, version: int, env_steps: int) -> None:
        """Send the policy's current weights to the actors (or the inference thread)."""
        self.version, self.env_steps = version, env_steps
        if self.server is not None:
            self.server.load(self.policy.state_dict(), version, env_steps)
            return
        state = tensors_from_state(self.policy.state_dict())
        self.pub.send_multipart(
            encode(Message(Kind.PARAMS, RUN_ID, 0, version, env_steps, state)), copy=False
        )

    def _answer_subscribers(self) -> None:
        """Publish the current policy again once for all actors that just subscribed."""
        joined = False
        while self.pub.poll(0):
            joined |= self.pub.recv()[:1] == bytes([SUBSCRIBE])
        if joined and self.server is None:
            self.publish(self.version, self.env_steps)

    def close(self) -> None:
        """Stop every actor process, then the sockets; removes the ipc directory."""
        for proc in self.procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout=5.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5.0)
        if self.server is not None:
            self.server.close()
        self.pull.close()
        self.pub.close()
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)
