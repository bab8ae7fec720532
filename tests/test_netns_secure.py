"""Secure by default on a network: two machines (namespaces), nodes bound to ``0.0.0.0``.

A node without a secret creates one (0600) and prints the join command; a peer without the secret is
refused; the printed command joins; a peer with the secret but another model is refused and both log why.
"""

from __future__ import annotations

import re
import shlex
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import PORT, Fabric, NsNode, fabric_fixture, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""), pytest.mark.timeout(300)]

TINY = ("--model", "random:tiny", "--dtype", "float32", "--no-discovery")
JOIN = re.compile(r"join another machine with:\n  (EXO_STABLE_CLUSTER_SECRET=\S+) exo-stable serve (.*)\n")


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    yield from fabric_fixture(2)


def test_a_network_node_makes_a_secret_refuses_strangers_and_prints_how_to_join(fabric: Fabric, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = NsNode(fabric, 0, "sec0", TINY, tmp_path / "sec0.log", env={"EXO_STABLE_STATE_DIR": str(state)})
    nodes = [first]
    try:
        first.start()
        log = first.wait_log("exo-stable: serving", timeout_s=60)
        secret_file = state / "cluster-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        match = JOIN.search(log)
        assert match, log
        secret_env, join_args = match.group(1), shlex.split(match.group(2))
        assert secret_env == f"EXO_STABLE_CLUSTER_SECRET={secret_file.read_text().strip()}"
        assert join_args == ["--host", "0.0.0.0", "--peers", f"{fabric.addr(0)}:{PORT}"], log
        assert "reachable from other machines without an API key" in log

        stranger = NsNode(
            fabric, 1, "sec1", (*TINY, "--insecure", "--peers", f"{fabric.addr(0)}:{PORT}"), tmp_path / "s1.log"
        )
        nodes.append(stranger)
        stranger.start()
        first.wait_log("sec1", timeout_s=60)
        log = first.wait_log("did not prove the cluster secret", timeout_s=30)
        assert "--insecure: " in stranger.wait_log("accepts any peer without a cluster secret", timeout_s=5)
        stranger.stop()

        name, _, value = secret_env.partition("=")
        joiner = NsNode(fabric, 1, "sec1", (*TINY, *join_args[2:]), tmp_path / "j1.log", env={name: value})
        nodes.append(joiner)
        joiner.start()
        fabric.wait_plan(["sec0", "sec1"], [0, 1], timeout_s=120)
        joiner.stop()

        other_model = ("--model", "random:tiny@1", "--dtype", "float32", "--no-discovery")
        mismatched = NsNode(fabric, 1, "sec2", (*other_model, *join_args[2:]), tmp_path / "m1.log", env={name: value})
        nodes.append(mismatched)
        mismatched.start()
        assert "this node serves" in first.wait_log("refusing peer sec2", timeout_s=60)
        assert "start every node with the same --model" in mismatched.wait_log("refusing peer sec0", timeout_s=30)
    finally:
        for node in nodes:
            node.stop()
