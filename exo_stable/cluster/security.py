"""Who may join: the cluster secret a node uses, decided at startup (secure by default).

- A node bound to loopback only (``127.0.0.1``, ``::1``, ``localhost``) is reachable from this machine
  alone: without ``--cluster-secret`` its peers need none.
- A node bound to any other address never accepts unauthenticated peers. Without a secret it creates one
  on first start, a random 256-bit token stored with mode 0600 in ``STATE_DIR/cluster-secret`` (and reads
  it on later starts), and prints the exact command that joins another machine.
- ``--insecure`` is the only way to an open cluster on a network; it is logged as a warning at each start.

Secrets come from ``--cluster-secret`` or ``EXO_STABLE_CLUSTER_SECRET`` first. The state directory is
``$EXO_STABLE_STATE_DIR``, else ``$XDG_STATE_HOME/exo-stable``, else ``~/.local/state/exo-stable``.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exo_stable import settings

SECRET_FILE = "cluster-secret"
STATE_ENV = settings.STATE_DIR.name

SecretSource = Literal["given", "file", "created", "loopback", "insecure"]


@dataclass(frozen=True)
class ClusterAuth:
    """The secret this node's peers must prove (None: none asked) and where it came from."""

    secret: bytes | None
    source: SecretSource
    path: Path | None = None


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    if state := settings.STATE_DIR.get(environ):
        return Path(state).expanduser()
    if xdg := settings.XDG_STATE_HOME.get(environ):
        return Path(xdg).expanduser() / "exo-stable"
    return Path.home() / ".local" / "state" / "exo-stable"


def is_loopback_only(host: str) -> bool:
    """Whether binding ``host`` leaves the node reachable from this machine alone."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def cluster_auth(host: str, given: bytes | None, *, insecure: bool, directory: Path | None = None) -> ClusterAuth:
    """Decide the cluster secret for a node bound to ``host`` (see the module docstring).

    Raises ValueError for ``--insecure`` together with a secret, and for a secret file others can read.
    """
    if given is not None:
        if insecure:
            raise ValueError("--insecure and a cluster secret contradict each other: drop one")
        return ClusterAuth(given, "given")
    if insecure:
        return ClusterAuth(None, "insecure")
    if is_loopback_only(host):
        return ClusterAuth(None, "loopback")
    path = (directory or state_dir()) / SECRET_FILE
    secret, created = load_or_create_secret(path)
    return ClusterAuth(secret, "created" if created else "file", path)


def load_or_create_secret(path: Path) -> tuple[bytes, bool]:
    """The secret stored at ``path``, or a new one written there with mode 0600; and whether it is new."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        pass
    else:
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ValueError(
                    f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}): run `chmod 600 {path}`"
                )
            secret = f.read().strip()
        if not secret:
            raise ValueError(f"{path} is empty: delete it to have a new secret made, or write one into it")
        return secret, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32).encode()
    # O_EXCL: two nodes starting at once on one machine never overwrite each other's secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return load_or_create_secret(path)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret, True


def join_command(secret: bytes, seed: str) -> str:
    """The command that joins another machine to this node's cluster, through ``seed`` (``host:port``)."""
    # Through the environment, not --cluster-secret: a command line is visible to every user in `ps`.
    return f"EXO_STABLE_CLUSTER_SECRET={secret.decode()} exo-stable serve --host 0.0.0.0 --peers {seed}"


__all__ = [
    "SECRET_FILE",
    "STATE_ENV",
    "ClusterAuth",
    "SecretSource",
    "cluster_auth",
    "is_loopback_only",
    "join_command",
    "load_or_create_secret",
    "state_dir",
]
