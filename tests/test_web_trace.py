"""What the web page reads from a trace: one token span per attempt (who computed which tokens), the
recovery that started each later attempt, and the live form without step records."""

from __future__ import annotations

from exo_stable.pipeline.trace import RequestTrace, StepRecord


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def step(trace: RequestTrace, position: int, node: str, stage: int, layers: tuple[int, int], attempt: int) -> None:  # noqa: PLR0917
    trace.step(
        StepRecord(
            step=position,
            position=position,
            node_id=node,
            stage=stage,
            layers=layers,
            tokens=7 if position == 0 else 1,
            stage_s=0.01,
            bytes_out=0,
            checksum="",
            attempt=attempt,
            at_s=trace.now(),
        )
    )


def test_spans_split_at_each_recovery_and_count_the_replayed_tokens() -> None:
    clock = Clock()
    trace = RequestTrace("chatcmpl-1", backend="pipeline", prompt_tokens=7, clock=clock)
    trace.event("plan", epoch=1, stages=[])
    for p in range(5):  # tokens 0..4 on a, b, c
        clock.t += 0.1
        for i, (node, layers) in enumerate([("a", (0, 10)), ("b", (10, 20)), ("c", (20, 30))]):
            step(trace, p, node, i, layers, 0)
    clock.t = 1.0
    trace.recovery(failure="node_lost", node_id="c", from_position=5, detail="links closed")
    trace.event("plan", epoch=2, stages=[])
    for p in range(5):  # replay of tokens 0..4 (prompt included) on a, b
        clock.t += 0.01
        step(trace, p, "a", 0, (0, 15), 1)
        step(trace, p, "b", 1, (15, 30), 1)
    clock.t = 2.5
    for p in range(5, 9):
        step(trace, p, "a", 0, (0, 15), 1)
        step(trace, p, "b", 1, (15, 30), 1)
    trace.tokens(9, 0.1)
    trace.end("length")

    first, second = trace.summary()["spans"]
    assert (first["attempt"], first["from_token"], first["to_token"], first["plan_epoch"]) == (0, 0, 4, 1)
    assert [(s["node_id"], s["layers"]) for s in first["stages"]] == [("a", [0, 10]), ("b", [10, 20]), ("c", [20, 30])]
    assert first["replayed_tokens"] == 0 and "recovery" not in first
    assert (second["attempt"], second["from_token"], second["to_token"], second["plan_epoch"]) == (1, 5, 8, 2)
    assert [s["node_id"] for s in second["stages"]] == ["a", "b"]
    assert second["replayed_tokens"] == 5
    assert second["recovery"]["node_id"] == "c" and second["recovery"]["from_position"] == 5
    assert second["resumed_after_ms"] == 1500.0  # the failure at 1.0 s, the first new token at 2.5 s


def test_live_is_the_summary_and_events_without_step_records() -> None:
    trace = RequestTrace("chatcmpl-2", backend="single_device", prompt_tokens=3)
    step(trace, 0, "single-device", 0, (0, 30), 0)
    trace.validation, trace.replay = "strict", "fast"
    live = trace.live()
    assert "step_records" not in live and live["events"] == [] and live["steps_dropped"] == 0
    assert live["validation"] == "strict" and live["replay"] == "fast"
    assert live["spans"][0]["stages"] == [{"stage": 0, "node_id": "single-device", "layers": [0, 30]}]
    assert set(trace.summary()) <= set(live)
