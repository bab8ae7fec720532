"""Machines for tests: network namespaces on one bridge, with real ``exo-stable serve`` processes in them.

:class:`Fabric` builds a "switch" namespace holding a bridge, N node namespaces and one client namespace,
each joined to the bridge by a veth pair, with addresses ``10.77.0.{i+1}/24`` for node i and ``10.77.0.200``
for the client (and ``fd77::{i+1}/64`` over IPv6). Nothing is added to the host's own namespace; every name
carries a random tag, and :meth:`Fabric.close` deletes what :meth:`Fabric.create` made. A partition takes
the switch-side end of a node's veth down: the node keeps its address and its sockets, but no packet passes
(as when a cable is pulled), until :meth:`Fabric.heal`.

The nodes are started with ``ip netns exec`` and bind ``0.0.0.0``. The test process cannot reach the
namespaces' addresses itself, so HTTP goes through ``tests/netns_client.py`` run in the client namespace.
Opts out of assert rewriting (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "tests" / "netns_client.py"
PORT = 52415
SUBNET = "10.77.0"
STOP_TIMEOUT_S = 30.0


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): tests skip with this reason."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"exoprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except RuntimeError as exc:
        return f"cannot create a bridge in a namespace: {exc}"
    finally:
        _ip("netns", "del", probe)
    return None


@dataclass
class Fabric:
    """N node namespaces and a client namespace on one bridge (see the module docstring)."""

    n: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    made: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"exo{self.tag}sw"

    @property
    def client_ns(self) -> str:
        return f"exo{self.tag}cl"

    def ns(self, i: int) -> str:
        return f"exo{self.tag}n{i}"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def addr6(self, i: int) -> str:
        return f"fd77::{i + 1}"

    def url(self, i: int, port: int = PORT, *, v6: bool = False) -> str:
        return f"http://[{self.addr6(i)}]:{port}" if v6 else f"http://{self.addr(i)}:{port}"

    @classmethod
    def create(cls, n: int) -> Fabric:
        fabric = cls(n)
        try:
            fabric._build()
        except BaseException:
            fabric.close()
            raise
        return fabric

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self.made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        members = [(self.ns(i), i + 1) for i in range(self.n)] + [(self.client_ns, 200)]
        for index, (ns, host) in enumerate(members):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Both ends are created in the node's namespace, then one end moves to the switch.
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{index}")
            _ip("-n", ns, "link", "set", f"p{index}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{index}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{index}", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", "eth0")
            _ip("-n", ns, "-6", "addr", "add", f"fd77::{host}/64", "dev", "eth0", "nodad")
            _ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            # zeroconf sends to 224.0.0.251: give multicast a route out of eth0.
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def partition(self, i: int) -> None:
        """Pull node i's cable: its veth's switch end goes down; nothing passes either way."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", f"p{i}", "up")

    def close(self) -> None:
        for ns in reversed(self.made):
            try:
                _ip("netns", "del", ns)
            except RuntimeError as exc:
                print(f"netns: could not delete {ns}: {exc}", file=sys.stderr)
        self.made.clear()

    # -- the client namespace ------------------------------------------------------------------------------

    def client(self, *args: str) -> subprocess.Popen[bytes]:
        """Start tests/netns_client.py with ``args`` in the client namespace; its stdout is a pipe."""
        cmd = ["ip", "netns", "exec", self.client_ns, sys.executable, str(CLIENT), *args]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def get(self, url: str) -> tuple[int, Any]:
        proc = self.client("get", url)
        out, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"GET {url} failed: {err.decode(errors='replace')}")
        reply = json.loads(out)
        return int(reply["status"]), reply["body"]

    def wait_plan(
        self, ids: list[str], nodes: list[int], timeout_s: float, *, v6: bool = False
    ) -> list[dict[str, Any]]:
        """Wait until every listed node shows the same plan whose stages are exactly ``ids``; their views."""
        proc = self.client("wait-plan", str(timeout_s), ",".join(ids), *(self.url(i, v6=v6) for i in nodes))
        out, err = proc.communicate(timeout=timeout_s + 30)
        reply = json.loads(out.splitlines()[-1]) if out.strip() else {"ready": False, "stderr": err.decode()}
        if not reply.get("ready"):
            raise TimeoutError(f"no plan with stages {ids} within {timeout_s:.0f}s: {json.dumps(reply)[:2000]}")
        views: list[dict[str, Any]] = reply["views"]
        return views


class Stream:
    """One streamed chat completion, read line by line as the client namespace's helper prints it."""

    def __init__(self, fabric: Fabric, node: int, body: dict[str, Any], *, v6: bool = False) -> None:
        self.proc = fabric.client("stream", fabric.url(node, v6=v6), json.dumps(body))
        self.lines: list[dict[str, Any]] = []
        self._buffer = b""

    def _read_line(self, deadline: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the stream gave no line in time")
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        self.lines.append(event)
        return event

    def wait_deltas(self, count: int, timeout_s: float) -> None:
        """Read until ``count`` deltas have come (raises if the stream ends or errs first)."""
        deadline = time.monotonic() + timeout_s
        while sum("delta" in e for e in self.lines) < count:
            event = self._read_line(deadline)
            if event is None or "delta" not in event:
                raise AssertionError(f"the stream ended before {count} deltas: {self.lines[-3:]}")

    def result(self, timeout_s: float) -> dict[str, Any]:
        """The final line ({"done": true, "text": ...} or {"error": ...}), reading the rest."""
        deadline = time.monotonic() + timeout_s
        while True:
            event = self._read_line(deadline)
            if event is None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"the client exited without a result: {err[-2000:]}")
            if "delta" not in event:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                return event

    def stall_s(self) -> float:
        """The longest gap between two deltas (the failover's stall, as the client sees it)."""
        times = [e["t"] for e in self.lines if "delta" in e]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@dataclass
class NsNode:
    """One ``exo-stable serve`` process in a namespace."""

    fabric: Fabric
    index: int
    node_id: str
    args: tuple[str, ...]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    host: str = "0.0.0.0"

    def start(self) -> None:
        cmd = ["ip", "netns", "exec", self.fabric.ns(self.index), sys.executable, "-m", "exo_stable", "serve"]
        cmd += ["--host", self.host, "--port", str(PORT), "--node-id", self.node_id, *self.args]
        env = dict(os.environ)
        for name in ("EXO_STABLE_API_KEY", "EXO_STABLE_PEERS", "EXO_STABLE_CLUSTER_SECRET"):
            env.pop(name, None)
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)
        if signum == signal.SIGKILL:
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def wait_log(self, text: str, timeout_s: float) -> str:
        """Poll the log until it contains ``text`` (raises with the log's tail past the deadline); the log."""
        deadline = time.monotonic() + timeout_s
        while text not in (log := self.log(tail=1 << 20)):
            if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                raise AssertionError(f"{self.node_id}'s log has no {text!r}:\n{log[-4000:]}")
            time.sleep(0.1)  # polling another process's output: nothing to wait on
        return log

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]
        except OSError as exc:
            return f"(no log: {exc})"


@dataclass
class Cluster:
    """Nodes 0..n-1 of a fabric, node i in namespace i."""

    fabric: Fabric
    nodes: list[NsNode]

    @classmethod
    def start(cls, fabric: Fabric, log_dir: Path, per_node: list[tuple[str, ...]]) -> Cluster:
        prefix = f"t{secrets.token_hex(3)}n"
        nodes = [
            NsNode(fabric, i, f"{prefix}{i}", args, log_dir / f"{prefix}{i}.log") for i, args in enumerate(per_node)
        ]
        for node in nodes:
            node.start()
        return cls(fabric, nodes)

    @property
    def ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    def logs(self) -> str:
        return "\n".join(f"--- {n.node_id} ---\n{n.log()}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fabric_fixture(n: int) -> Iterator[Fabric]:
    """For a module-scoped pytest fixture: the fabric, deleted afterwards."""
    fabric = Fabric.create(n)
    try:
        yield fabric
    finally:
        fabric.close()
