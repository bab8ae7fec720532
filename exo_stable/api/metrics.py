"""Prometheus metrics of one node: ``GET /metrics`` in the text exposition format.

Each node (and each API app) has its own :class:`Metrics` with its own ``CollectorRegistry``, never the
process-global one, so that several nodes in one process (tests, ``verify``) keep separate figures.

Two kinds of figures:

- **observed** where the latency happens: the API layer sees every request's tokens arrive, whatever the
  backend (single device or pipeline), and feeds :class:`RequestObserver`: time to first token, inter-token
  latency, tokens generated, prefill and decode rates, requests by outcome;
- **collected** at scrape time from the typed statistics the parts keep (:class:`ServiceCollector` reads
  the service's, :class:`NodeCollector` the node's :class:`~exo_stable.pipeline.statistics.NodeStatistics`):
  active requests, KV cache bytes, per-link RTT, bytes, retransmissions and bad
  frames, stage steps, bad activations and spot-check mismatches, the owner's token checksum and text
  validation findings, recovery events, mechanisms and outcomes. Nothing is counted
  twice: a scrape reads the same counters ``/health`` shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from exo_stable.engine.histogram import Histogram as Counts
    from exo_stable.pipeline.ownerstate import OwnerStatistics
    from exo_stable.pipeline.service import Service
    from exo_stable.pipeline.stagestate import StageStatistics
    from exo_stable.pipeline.statistics import NodeStatistics

__all__ = ["CONTENT_TYPE", "BatchCollector", "Metrics", "NodeCollector", "RequestObserver", "ServiceCollector"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "exo_stable"

# Latency buckets: from a fast local step (ms) to a slow first token on a loaded cluster (minutes).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CORRUPTIONS_DOC = (
    "Corruptions detected, by kind: frame_<reason> and message on links; activation, activation_source and"
    " spot_check at stages; token_checksum, token_rejected, invalid_utf8, suspicious_text and output_detector"
    " (the CorruptionDetector on the assembled answer) at the owner"
)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The registry of one node and the figures the API layer observes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a request's admission to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive generated tokens as the API receives them (a delta that brings k tokens"
            " counts its gap k times, divided by k)",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(f"{PREFIX}_tokens_generated", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of requests that started", registry=r)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests ended, by outcome (finish reason, cancelled, error)",
            ["outcome"],
            registry=r,
        )
        self.prefill_seconds = Counter(
            f"{PREFIX}_prefill_seconds", "Seconds from admission to first token, summed over requests", registry=r
        )
        self.decode_seconds = Counter(
            f"{PREFIX}_decode_seconds", "Seconds from first to last token, summed over requests", registry=r
        )
        self.decode_tokens = Counter(
            f"{PREFIX}_decode_tokens", "Tokens generated after each request's first one", registry=r
        )
        self.prefill_rate = Gauge(
            f"{PREFIX}_prefill_tokens_per_second", "Prompt tokens per second of the last request to start", registry=r
        )
        self.decode_rate = Gauge(
            f"{PREFIX}_decode_tokens_per_second", "Decode tokens per second of the last request to end", registry=r
        )

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        """The text exposition of every metric of this registry."""
        return generate_latest(self.registry)


class RequestObserver:
    """One request's token arrivals turned into latency observations (feed it after every delta)."""

    def __init__(self, metrics: Metrics, prompt_tokens: int, *, clock: Callable[[], float] = time.perf_counter):
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.clock = clock
        self.started = clock()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.ended = False
        metrics.prompt_tokens.inc(prompt_tokens)

    def on_tokens(self, total: int) -> None:
        """``total`` completion tokens have arrived so far."""
        new = total - self.tokens
        if new <= 0:
            return
        now = self.clock()
        m = self.metrics
        m.tokens.inc(new)
        if self.first is None or self.last is None:
            self.first = self.last = now
            prefill = now - self.started
            m.ttft.observe(prefill)
            m.prefill_seconds.inc(prefill)
            if prefill > 0:
                m.prefill_rate.set(self.prompt_tokens / prefill)
            new -= 1
        if new > 0:
            gap = (now - self.last) / new
            for _ in range(new):
                m.itl.observe(gap)
        self.last = now
        self.tokens = total

    def end(self, outcome: str) -> None:
        """The request ended (``stop``, ``length``, ``cancelled``, ``error``...); idempotent."""
        if self.ended:
            return
        self.ended = True
        m = self.metrics
        m.requests.labels(outcome).inc()
        if self.first is not None and self.last is not None and self.tokens > 1:
            decode = self.last - self.first
            m.decode_seconds.inc(decode)
            m.decode_tokens.inc(self.tokens - 1)
            if decode > 0:
                m.decode_rate.set((self.tokens - 1) / decode)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class _Families:
    """Labelled families built up during one scrape, yielded at its end (one family per name)."""

    def __init__(self) -> None:
        self._families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def add(self, kind: str, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        full = f"{PREFIX}_{name}"
        family = self._families.get(full)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self._families[full] = cls(full, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)

    def counter(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self.add("counter", name, doc, labels, value)

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self.add("gauge", name, doc, labels, value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(list(self._families.values()))


class ServiceCollector(Collector):
    """What any :class:`~exo_stable.pipeline.service.Service` knows: active requests and its KV cache bytes."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        s = self.service.statistics()
        yield _gauge("active_requests", "Requests admitted and generating now", s.active)
        yield _gauge("max_active_requests", "Requests that may generate at once", s.max_active)
        yield _gauge("queued_requests", "Requests waiting for a slot (at most --max-queue)", s.queued)
        yield CounterMetricFamily(
            f"{PREFIX}_overloaded_requests",
            "Requests refused with 429 because the queue was full",
            s.refused_overloaded,
        )
        if s.kv_cache_bytes is not None:
            yield _gauge(
                "kv_cache_bytes", "Bytes held by the KV caches of open requests on this node", s.kv_cache_bytes
            )


class BatchCollector(Collector):
    """The service's continuous batching: rows per decode step and prompts waiting, as histograms."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        stats = self.service.batch_stats()
        if stats is None:
            return
        for name, doc, hist in (
            ("decode_batch_size", "Requests whose decode positions one forward step carried", stats.batch_size),
            ("batch_queue_depth", "Admitted requests whose prompt had not started, at each step", stats.queue_depth),
        ):
            yield _histogram(name, doc, hist)


def _histogram(name: str, doc: str, hist: Counts, labels: dict[str, str] | None = None) -> Metric:
    family = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels or {}))
    buckets = [(bound, float(n)) for bound, n in hist.labelled(str)]
    family.add_metric(list((labels or {}).values()), buckets, sum_value=hist.total)
    return family


def stage_batching(stage: StageStatistics) -> Iterator[Metric]:
    """The node's stage's continuous batching: rows per forward call, and steps queued when each compute step
    began (both histograms), and the steps queued now."""
    layers = f"{stage.layers[0]}-{stage.layers[1]}"
    for name, doc, hist in (
        ("stage_batch_size", "Requests' steps per forward call on this node's stage", stage.counters.batch_size),
        (
            "stage_queue_depth",
            "Ready steps queued at this node's stage when a compute step began",
            stage.counters.queue_depth,
        ),
    ):
        yield _histogram(name, doc, hist, {"layers": layers})
    yield GaugeMetricFamily(
        f"{PREFIX}_stage_queued_steps", "Ready steps waiting for the stage's compute thread", value=stage.queued
    )


class NodeCollector(Collector):
    """A cluster node's links, stage, owned requests and recoveries: one :class:`NodeStatistics` snapshot per
    scrape, from the callable the node gives it."""

    def __init__(self, statistics: Callable[[], NodeStatistics]) -> None:
        self.statistics = statistics

    def collect(self) -> Iterable[Metric]:
        f = _Families()
        node = self.statistics()
        _links(f, node)
        if node.stage is not None:
            _stage(f, node.stage)
        _owner(f, node.owner)
        yield from f
        if node.stage is not None:
            yield from stage_batching(node.stage)


def _links(f: _Families, node: NodeStatistics) -> None:
    members = node.cluster.members  # only members get labels: strangers cannot grow the scrape
    peers = node.peers
    for kind, n in sorted(node.refusals.items()):
        f.counter("peer_messages_refused", "Peer messages refused (the sender lacks the role)", {"kind": kind}, n)
    for reason, n in sorted(peers.handshakes_refused.items()):
        f.counter("peer_handshakes_refused", "Incoming peer connections refused", {"reason": reason}, n)
    for peer in peers.connected():
        if peer in members:
            f.gauge("peers_connected", "1 for each peer with a connected link", {"peer": peer}, 1.0)
    for peer, direction, st in peers.links():
        if peer not in members:
            continue
        labels = {"peer": peer, "link": direction}
        if st.rtt_s is not None:
            f.gauge("peer_rtt_seconds", "Smoothed round-trip time of the link's data frames", labels, st.rtt_s)
        f.counter("peer_bytes_sent", "Frame bytes written to the link's socket", labels, st.bytes_sent)
        f.counter("peer_bytes_received", "Frame bytes read from the link's socket", labels, st.bytes_received)
        f.counter("peer_frames_sent", "Frames written to the link's socket", labels, st.frames_sent)
        f.counter("peer_messages_sent", "Messages queued on the link", labels, st.messages_sent)
        f.counter("peer_retransmits", "Data frames sent again (lost, corrupted or late)", labels, st.retransmissions)
        f.counter("peer_duplicates_suppressed", "Duplicate data frames dropped", labels, st.duplicates_suppressed)
        f.counter("peer_reconnects", "Connections of the link after its first", labels, max(0, st.connects - 1))
        for reason, n in st.bad_frames_by_reason.items():
            f.counter("corruptions_detected", CORRUPTIONS_DOC, {"kind": f"frame_{reason}", "peer": peer}, n)
        if st.undecodable:
            f.counter("corruptions_detected", CORRUPTIONS_DOC, {"kind": "message", "peer": peer}, st.undecodable)
        for fault, n in (st.faults or {}).items():
            f.counter("faults_injected", "Faults injected on the link's inbound frames", {**labels, "fault": fault}, n)


def _stage(f: _Families, stage: StageStatistics) -> None:
    st = stage.counters
    labels = {"layers": f"{stage.layers[0]}-{stage.layers[1]}"}
    f.counter("stage_steps", "Forward steps this node's stage ran", labels, st.steps)
    f.counter("stage_tokens_sent", "Tokens the last stage sampled and sent", labels, st.tokens_sent)
    f.counter("stage_stale_steps", "Steps for requests no longer open here (dropped)", labels, st.stale_steps)
    f.counter("stage_failures", "Requests this stage failed (its owner recovers them)", labels, st.failures)
    f.counter("stage_tokens_resent", "Tokens sent again on an owner's request", labels, st.resent)
    f.counter("stage_replayed_steps", "Replay steps fed forward after a failure", labels, st.replayed)
    for kind, n in (
        ("activation", st.bad_activations - st.source_checksum_failures),
        ("activation_source", st.source_checksum_failures),
        ("spot_check", st.spot_check_mismatches),
    ):
        f.counter("corruptions_detected", CORRUPTIONS_DOC, {"kind": kind, "peer": ""}, n)
    f.counter("stage_spot_checks", "Steps computed twice and compared (strict validation)", labels, st.spot_checks)


def _owner(f: _Families, owner: OwnerStatistics) -> None:
    s = owner.counters
    states = (("started", s.requests), ("finished", s.finished), ("failed", s.failed), ("cancelled", s.cancelled))
    for state, n in states:
        f.counter("owner_requests", "Requests owned by this node, by state", {"state": state}, n)
    f.counter("owner_resend_requests", "Token positions asked for again (missing or invalid)", {}, s.resend_requests)
    f.counter("owner_late_messages", "Stage messages for requests already closed", {}, s.late_messages)
    v = owner.validation.counters
    for kind, n in (
        ("token_checksum", v.token_checksum_failures),
        ("token_rejected", v.tokens_rejected - v.token_checksum_failures),
        ("invalid_utf8", v.invalid_utf8_deltas),
        ("suspicious_text", v.suspicious_deltas),
        ("output_detector", v.output_findings),
    ):
        f.counter("corruptions_detected", CORRUPTIONS_DOC, {"kind": kind, "peer": ""}, n)
    for level, n in v.requests.items():
        f.counter("validation_requests", "Requests owned here, by validation level", {"level": level}, n)
    r = owner.recovery
    for kind, n in r.events.items():
        f.counter("recovery_events", "Failure events seen by the recovery manager, by kind", {"kind": kind}, n)
    for cls, n in r.classes.items():
        f.counter("recovery_decisions", "Failures classified, by class", {"class": cls}, n)
    for mechanism, n in r.mechanisms.items():
        f.counter("recoveries", "Recoveries begun, by the mechanism chosen", {"mechanism": mechanism}, n)
    for outcome, n in r.outcomes.items():
        f.counter("recovery_outcomes", "Recoveries ended, by outcome", {"outcome": outcome}, n)
    if r.resume_s:
        f.gauge("recovery_last_resume_seconds", "How long the last recovered stream paused", {}, r.resume_s[-1])
