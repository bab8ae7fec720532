"""The HTTP client of the namespace tests: it runs inside the client namespace (``ip netns exec``), where the
nodes' addresses are reachable, and reports on stdout as JSON lines. Standard library only, so it starts fast.

    netns_client.py get URL                       one line: {"status": S, "body": ...}
    netns_client.py wait-plan TIMEOUT IDS URL...  polls every URL's /v1/cluster until all show one plan whose
                                                  stages are exactly IDS (comma-separated); prints the views
    netns_client.py stream URL BODY_JSON          streams a chat completion: one line per delta
                                                  {"delta": text, "t": seconds, "m": monotonic clock},
                                                  then {"done": true, "text": ...}
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def get(url: str, timeout: float = 3.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def say(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_plan(timeout: float, ids: list[str], urls: list[str]) -> int:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        views = []
        try:
            for url in urls:
                status, view = get(f"{url}/v1/cluster")
                views.append(view if status == 200 else None)
        except (OSError, ValueError) as exc:
            last = repr(exc)
            time.sleep(0.2)  # polling other processes: nothing to wait on
            continue
        plans = [v.get("plan") if v else None for v in views]
        keys = {(p["epoch"], tuple(s["node_id"] for s in p["stages"])) if p else None for p in plans}
        if len(keys) == 1 and (key := keys.pop()) is not None and sorted(key[1]) == sorted(ids):
            say({"ready": True, "views": views})
            return 0
        last = views
        time.sleep(0.2)  # polling other processes: nothing to wait on
    say({"ready": False, "last": last})
    return 1


def stream(url: str, body: dict[str, Any]) -> int:
    body = {**body, "stream": True}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.monotonic()
    text = []
    finish = None
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    say({"error": event["error"]})
                    return 1
                choice = event["choices"][0]
                piece = choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
                if piece:
                    text.append(piece)
                    say({"delta": piece, "t": round(time.monotonic() - start, 4), "m": time.monotonic()})
    except urllib.error.HTTPError as exc:
        say({"error": exc.code, "body": exc.read().decode(errors="replace")})
        return 1
    say({"done": True, "text": "".join(text), "finish": finish, "t": round(time.monotonic() - start, 4)})
    return 0


def main(argv: list[str]) -> int:
    match argv:
        case ["get", url]:
            status, body = get(url)
            say({"status": status, "body": body})
            return 0
        case ["wait-plan", timeout, ids, *urls]:
            return wait_plan(float(timeout), ids.split(","), urls)
        case ["stream", url, body]:
            return stream(url, json.loads(body))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
