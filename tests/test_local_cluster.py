"""``scripts/local-cluster``: starts a real 2-node pipeline, serves through any node, and leaves no node behind.

Each test runs the script on free ports with a node-id prefix of its own, and finds the nodes it started by
scanning ``/proc/*/cmdline`` for those node ids.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_proc import LocalCluster, node_pids, wait_gone
from openai import OpenAI

START_TIMEOUT_S = 240.0
GONE_TIMEOUT_S = 15.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A 2-node cluster started by the script; whatever a test does, no node of it outlives the test."""
    cluster = LocalCluster.launch(2, "--log-dir", str(tmp_path))
    try:
        yield cluster
    finally:
        cluster.stop()
        left = wait_gone(cluster.node_ids, GONE_TIMEOUT_S)
        assert not left, f"nodes still running after the test: {left}"


def _ready_and_serving(cluster: LocalCluster) -> dict[int, str]:
    """Wait for the endpoint, check that both nodes run as the script's children and that node1 answers a chat."""
    try:
        endpoint = cluster.wait_ready(START_TIMEOUT_S)
    except (TimeoutError, RuntimeError) as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from exc
    assert endpoint == cluster.base_url(0), cluster.text
    assert cluster.base_url(1) in cluster.text, "the script should say that the other node's port serves too"
    assert cluster.log_dir is not None, cluster.text
    assert all((cluster.log_dir / f"{n}.log").is_file() for n in cluster.node_ids), cluster.text
    pids = node_pids(cluster.node_ids)
    assert sorted(pids.values()) == cluster.node_ids, pids
    for pid in pids:
        assert _ppid(pid) == cluster.proc.pid, f"node {pids[pid]} is not a child of the script"
    with OpenAI(base_url=cluster.base_url(1), api_key="unused", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=4,
            temperature=0,
        )
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content, reply
    assert choice.finish_reason == "length", reply
    assert reply.usage is not None and reply.usage.completion_tokens == 4, reply.usage
    return pids


def _ppid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def test_sigterm_stops_every_node_cleanly(cluster: LocalCluster) -> None:
    _ready_and_serving(cluster)
    cluster.signal(signal.SIGTERM)
    status = cluster.wait_exit()
    assert status == 0, cluster.text
    for node_id in cluster.node_ids:
        assert f"local-cluster: {node_id} exited with status 0" in cluster.text, cluster.text
    # The script waited for its nodes before it exited: none may be left, not even for a moment.
    assert not node_pids(cluster.node_ids), cluster.text


def test_nodes_die_with_the_script_when_it_is_killed(cluster: LocalCluster) -> None:
    pids = _ready_and_serving(cluster)
    cluster.signal(signal.SIGKILL)
    assert cluster.wait_exit() == -signal.SIGKILL
    left = wait_gone(cluster.node_ids, GONE_TIMEOUT_S)
    assert not left, f"nodes {left} outlived the killed script (started as {pids})"


def test_a_node_that_dies_during_startup_stops_the_cluster(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    cluster = LocalCluster.launch(2, "--model", str(missing), "--log-dir", str(tmp_path / "logs"))
    try:
        status = cluster.wait_exit(START_TIMEOUT_S)
    finally:
        cluster.stop()
    assert status == 1, cluster.text
    assert "during startup" in cluster.text, cluster.text
    assert str(missing) in cluster.text, "the failed node's log tail should be shown"
    assert cluster.log_dir == tmp_path / "logs", cluster.text
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"{n}.log" for n in cluster.node_ids]
    assert not wait_gone(cluster.node_ids, GONE_TIMEOUT_S), cluster.text


def _stages(cluster: LocalCluster, node: int, count: int, timeout_s: float) -> list[str]:
    """Poll node's /v1/cluster until its plan has ``count`` stages; their node ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{cluster.root(node)}/v1/cluster", timeout=5) as resp:
                plan = json.loads(resp.read())["plan"]
        except OSError:
            plan = None
        if plan and len(plan["stages"]) == count:
            return [s["node_id"] for s in plan["stages"]]
        assert time.monotonic() < deadline, f"no {count}-stage plan on node {node}:\n{cluster.text}\n{cluster.logs()}"
        time.sleep(0.2)  # polling another process's state


def test_a_node_that_dies_while_serving_is_reported_and_restarted(tmp_path: Path) -> None:
    """The others keep serving; --restart brings the node back with its id, and it rejoins the plan."""
    tiny = ("--model", "random:tiny", "--dtype", "float32", "--suspect-seconds", "3")
    cluster = LocalCluster.launch(2, "--log-dir", str(tmp_path), "--restart", *tiny)
    try:
        cluster.wait_ready(START_TIMEOUT_S)
        victim = cluster.node_ids[1]
        (pid,) = [p for p, n in node_pids(cluster.node_ids).items() if n == victim]
        os.kill(pid, signal.SIGKILL)
        cluster.wait_output(f"{victim} (pid {pid}) died (signal SIGKILL) while serving", 30)
        assert f"1 node(s) keep serving: {cluster.node_ids[0]}" in cluster.text
        assert _stages(cluster, 0, 1, 60) == [cluster.node_ids[0]]
        with OpenAI(base_url=cluster.base_url(0), api_key="unused", max_retries=0, timeout=60) as client:
            reply = client.completions.create(model="default", prompt="abc", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason == "length"
        cluster.wait_output(f"restarted {victim}", 30)
        assert sorted(_stages(cluster, 0, 2, 120)) == cluster.node_ids
        assert cluster.proc.poll() is None, "the script keeps running"
    finally:
        status = cluster.stop()
    assert status == 0, cluster.text
    assert not wait_gone(cluster.node_ids, GONE_TIMEOUT_S), cluster.text


def test_without_restart_the_script_exits_when_every_node_died(tmp_path: Path) -> None:
    cluster = LocalCluster.launch(1, "--log-dir", str(tmp_path), "--model", "random:tiny", "--dtype", "float32")
    try:
        cluster.wait_ready(START_TIMEOUT_S)
        (pid,) = node_pids(cluster.node_ids)
        os.kill(pid, signal.SIGKILL)
        status = cluster.wait_exit()
    finally:
        cluster.stop()
    assert status == 1, cluster.text
    assert "every node is dead" in cluster.text, cluster.text
