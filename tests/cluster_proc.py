"""Run ``scripts/local-cluster`` from tests: pick free ports, read its endpoint line, stop it, find its nodes.

Every cluster gets a node-id prefix of its own, so that :func:`node_pids` finds its nodes (in
``/proc/*/cmdline``) and never another test's. Opts out of assert rewriting (PYTEST_DONT_REWRITE): test
modules import it; its asserts carry their own messages.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-cluster"
ENDPOINT = re.compile(rb"local-cluster: endpoint (http://127\.0\.0\.1:(\d+)/v1)\n")
READY_LAST = b"local-cluster: press Ctrl-C"  # the last line the script prints once the pipeline is ready
LOG_DIR = re.compile(rb"local-cluster: node logs in (\S+)\n")
STOP_TIMEOUT_S = 60.0

# Below Linux's ephemeral range (32768-60999), so that no outgoing connection takes one of these ports.
_PORT_LOW, _PORT_HIGH = 20000, 32000


def free_port_block(n: int, attempts: int = 200) -> int:
    """A base port such that base..base+n-1 can all be bound on 127.0.0.1 right now."""
    for _ in range(attempts):
        base = random.randrange(_PORT_LOW, _PORT_HIGH - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"found no {n} free consecutive ports in {attempts} attempts")


def node_pids(node_ids: list[str]) -> dict[int, str]:
    """Running processes (pid: node id) whose command line has ``--node-id`` set to one of ``node_ids``."""
    wanted = set(node_ids)
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue  # gone meanwhile
        if "Z" in state.split()[1]:
            continue  # a zombie has exited; only its parent's wait is missing
        for flag, value in itertools.pairwise(argv):
            if flag == "--node-id" and value in wanted:
                found[int(entry.name)] = value
    return found


def wait_gone(node_ids: list[str], timeout_s: float) -> dict[int, str]:
    """Poll /proc until no process runs as one of ``node_ids`` or the deadline passes; what still runs."""
    deadline = time.monotonic() + timeout_s
    while (left := node_pids(node_ids)) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling other processes' state: nothing to wait on
    return left


@dataclass
class LocalCluster:
    """One ``scripts/local-cluster`` process and what it printed."""

    proc: subprocess.Popen[bytes]
    n: int
    base_port: int
    prefix: str
    args: tuple[str, ...] = ()
    output: bytearray = field(default_factory=bytearray)
    endpoint: str | None = None

    @property
    def node_ids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.n)]

    @property
    def ports(self) -> list[int]:
        return [self.base_port + i for i in range(self.n)]

    def base_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.base_port + i}/v1"

    def root(self, i: int) -> str:
        return f"http://127.0.0.1:{self.base_port + i}"

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    @property
    def log_dir(self) -> Path | None:
        match = LOG_DIR.search(self.output)
        return Path(match.group(1).decode()) if match else None

    def logs(self) -> str:
        """Every node's log, for failure messages."""
        log_dir = self.log_dir
        if log_dir is None:
            return ""
        parts = []
        for node_id in self.node_ids:
            path = log_dir / f"{node_id}.log"
            if path.exists():
                parts.append(f"--- {path} ---\n{path.read_text(encoding='utf-8', errors='replace')[-3000:]}")
        return "\n".join(parts)

    @classmethod
    def launch(cls, n: int, *args: str) -> LocalCluster:
        """Start the script for ``n`` nodes on free ports with a fresh node-id prefix; do not wait."""
        base = free_port_block(n)
        prefix = f"t{secrets.token_hex(4)}n"
        cmd = [sys.executable, str(SCRIPT), str(n), "--base-port", str(base), "--node-prefix", prefix, *args]
        env = dict(os.environ)
        for name in ("EXO_STABLE_API_KEY", "EXO_STABLE_PEERS", "EXO_STABLE_CLUSTER_SECRET"):
            env.pop(name, None)  # only the flags given here configure the nodes
        out = subprocess.PIPE
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        return cls(proc=proc, n=n, base_port=base, prefix=prefix, args=args)

    def wait_ready(self, timeout_s: float, retries: int = 2) -> str:
        """:meth:`wait_endpoint`, starting again on other ports when one of ours was taken meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.wait_endpoint(deadline - time.monotonic())
            except RuntimeError:
                if retries <= 0 or "address already in use" not in self.text.lower():
                    raise
            retries -= 1
            self.stop()
            again = LocalCluster.launch(self.n, *self.args)
            self.proc, self.base_port, self.prefix, self.output = again.proc, again.base_port, again.prefix, bytearray()

    def wait_endpoint(self, timeout_s: float) -> str:
        """Read the script's output until it prints the endpoint (the pipeline is ready); raise if it exits first."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while READY_LAST not in self.output:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"local-cluster printed no endpoint within {timeout_s:.0f}s:\n{self.text}")
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    code = self.proc.wait(timeout=STOP_TIMEOUT_S)
                    raise RuntimeError(f"local-cluster exited ({code}) before it was ready:\n{self.text}")
                self.output += chunk
        match = ENDPOINT.search(self.output)
        assert match is not None, f"no endpoint line:\n{self.text}"
        self.endpoint = match.group(1).decode()
        return self.endpoint

    def wait_output(self, text: str, timeout_s: float) -> None:
        """Read the script's output until it contains ``text``; raise if the deadline passes or the script exits."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while text.encode() not in self.output:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"local-cluster did not print {text!r} within {timeout_s:.0f}s:\n{self.text}")
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"local-cluster exited before printing {text!r}:\n{self.text}")
                self.output += chunk

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the script to exit, reading the rest of its output; its exit status."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(timeout=left):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break  # end of output: the script has exited or is about to
                self.output += chunk
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1.0))

    def stop(self) -> int:
        """SIGTERM, wait with a deadline (SIGKILL if needed, and then the nodes die with the script); exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.wait_exit()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
