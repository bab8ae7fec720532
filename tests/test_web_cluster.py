"""The web page on a 3-node cluster (real node processes), in a real headless
browser: the cluster view shows the 3 nodes and their layers; a stage's node SIGKILLed mid-answer, the
answer completes equal to the uninterrupted one, and the recovery is shown inline with the answer.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import (
    PHONE,
    active_messages,
    chrome,
    console_errors,
    generating,
    page_text,
    screenshot,
    send,
    set_settings,
    streamed_text,
    wait,
    wait_answer,
)
from cluster_proc import free_port_block

pytestmark = pytest.mark.timeout(420)

PROMPT = "Count from 1 to 100, separated by commas."
MAX_TOKENS = 48


@dataclass
class Nodes:
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]
    ids: list[str]
    logs: list[Path]

    def root(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def base_url(self, i: int) -> str:
        return self.root(i) + "/v1"

    def log_tails(self) -> str:
        return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Three ``exo-stable serve`` processes (not ``scripts/local-cluster``, which stops every node when one
    dies), peered with each other, once their 3-stage plan is committed on all of them."""
    tmp = tmp_path_factory.mktemp("web-cluster")
    base = free_port_block(3)
    ports = [base + i for i in range(3)]
    prefix = f"w{secrets.token_hex(3)}n"
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    secret = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k not in ("EXO_STABLE_API_KEY", "EXO_STABLE_PEERS")}
    nodes = Nodes(ports, [], [f"{prefix}{i}" for i in range(3)], [tmp / f"node{i}.log" for i in range(3)])
    for i, port in enumerate(ports):
        cmd = [sys.executable, "-m", "exo_stable", "serve", "--port", str(port), "--node-id", nodes.ids[i]]
        cmd += ["--peers", peers, "--no-discovery", "--dtype", "float32", "--cluster-secret", secret]
        with nodes.logs[i].open("wb") as log:  # the child has its own copy of the descriptor
            nodes.procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            )
    try:
        deadline = time.monotonic() + 240
        while not _three_stages(nodes):
            assert time.monotonic() < deadline, f"no 3-stage plan within 240 s:\n{nodes.log_tails()}"
            assert all(p.poll() is None for p in nodes.procs), f"a node exited:\n{nodes.log_tails()}"
            time.sleep(0.5)  # polling other processes: nothing to wait on
        yield nodes
    finally:
        for proc in nodes.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in nodes.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    for proc, log in zip(nodes.procs, nodes.logs, strict=True):
        if proc.returncode != -signal.SIGKILL:  # the survivors stopped cleanly and logged no traceback
            text = log.read_text(errors="replace")
            assert proc.returncode == 0, f"{log} exited {proc.returncode}:\n{text[-3000:]}"
            assert "Traceback" not in text, text[-5000:]


def _three_stages(nodes: Nodes) -> bool:
    try:
        plans = [get(nodes.base_url(i) + "/cluster")["plan"] for i in range(3)]
    except OSError:
        return False
    return all(p is not None and len(p["stages"]) == 3 for p in plans) and len({p["epoch"] for p in plans}) == 1


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def reference(cluster: Nodes) -> str:
    body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": MAX_TOKENS}
    req = urllib.request.Request(
        cluster.base_url(0) + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=180) as resp:
        return str(json.loads(resp.read())["choices"][0]["message"]["content"])


def test_cluster_view_then_a_node_killed_mid_answer(cluster: Nodes) -> None:
    view = get(cluster.base_url(0) + "/cluster")
    assert len(view["nodes"]) == 3 and view["plan"] is not None
    expected = {n["id"]: n["layers"] for n in view["nodes"]}
    uninterrupted = reference(cluster)
    with chrome() as driver:
        driver.get(cluster.root(0) + "/#cluster")
        cards = wait(
            driver,
            lambda d: len(found := d.find_elements("css selector", "#cluster-view article.node")) == 3 and found,
            30,
            "3 node cards",
        )
        for card in cards:
            node = card.get_attribute("data-node")
            start, end = expected[node]
            assert card.find_element("css selector", ".layers").text.startswith(f"{start}–{end - 1} ")
            assert "alive" in card.text and "memory" in card.text and "127.0.0.1:" in card.text
        segments = driver.find_elements("css selector", ".plan .layerbar .seg")
        assert [s.get_attribute("data-node") for s in segments] == [s["node_id"] for s in view["plan"]["stages"]]
        assert driver.find_element("css selector", ".plan-epoch").text == str(view["plan"]["epoch"])
        assert driver.find_element("css selector", ".plan-leader").text == view["plan"]["leader"]
        wait(driver, lambda d: "RTT" in d.find_element("id", "cluster-view").text, 15, "link RTTs")
        screenshot(driver, "cluster")
        screenshot(driver, "cluster-phone", PHONE)
        driver.set_window_size(1280, 860)

        # Kill the last stage's node mid-answer: the answer completes, equal to the uninterrupted one.
        driver.find_element("id", "tab-chat").click()
        set_settings(driver, temperature=0, max_tokens=MAX_TOKENS)
        send(driver, PROMPT)
        wait(driver, lambda d: len(streamed_text(d)) >= 6, 120, "the first tokens")
        assert generating(driver), "the answer ended before the node could be killed"
        last = view["plan"]["stages"][-1]["node_id"]
        cluster.procs[cluster.ids.index(last)].kill()  # SIGKILL
        answer = wait_answer(driver, 180)
        assert answer["content"] == uninterrupted, cluster.log_tails()
        trace = answer["meta"]["trace"]
        assert trace["recoveries"] >= 1 and trace["finish_reason"] in ("stop", "length")
        note = wait(
            driver,
            lambda d: (n := d.find_elements("css selector", "article.assistant .recovery")) and n[0].text,
            10,
            "the recovery note",
        )
        assert re.search(rf"node {last} lost at token \d+, resumed on plan \d+ after [\d.]+ m?s", note), note
        assert "answer unchanged" in note, note
        spans = driver.find_elements("css selector", "article.assistant .span")
        assert len(spans) >= 2 and last in spans[0].text and last not in spans[-1].text
        assert "validation light" in page_text(driver)
        driver.execute_script("document.getElementById('settings').open = false")
        screenshot(driver, "chat-recovery")

        # The cluster view follows: the new plan has no layers on the killed node.
        driver.find_element("id", "tab-cluster").click()
        wait(
            driver,
            lambda d: len(d.find_elements("css selector", ".plan .layerbar .seg")) == 2,
            30,
            "the plan without the killed node",
        )
        assert len(active_messages(driver)) == 2
        assert console_errors(driver) == []
