"""Prometheus metrics (serving.md): base units, `_total` counters, histograms, no per-head labels.

Each service instance owns its registry, so several apps (tests, reloads) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "reprmerge"
# Latency buckets from 1 ms to 30 s: CPU batches take tens of ms, GPU ones a few.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """All service metrics on one registry; `render()` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route template and status code",
                                ["route", "code"], registry=r)
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Time from request received to response sent", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            f"{PREFIX}_queue_duration_seconds", "Time a request waited for a batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_duration = Histogram(
            f"{PREFIX}_inference_duration_seconds", "Time of one batch: heads, tokenisation and forward",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Inputs (texts) per backbone pass", buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_heads = Histogram(f"{PREFIX}_batch_distinct_heads", "Distinct preference heads per batch",
                                     buckets=SIZE_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests admitted and waiting for a batch", registry=r)
        self.heads_queue_depth = Gauge(f"{PREFIX}_heads_queue_depth", "Work items waiting for the heads thread",
                                       registry=r)
        self.in_flight = Gauge(f"{PREFIX}_in_flight_requests", "HTTP requests being handled", registry=r)
        self.cache_hits = Counter(f"{PREFIX}_head_cache_hits", "Head lookups answered from the cache", registry=r)
        self.cache_misses = Counter(f"{PREFIX}_head_cache_misses", "Head lookups that needed a solve (or joined one)",
                                    registry=r)
        self.cache_evictions = Counter(f"{PREFIX}_head_cache_evictions", "Heads evicted to stay within the byte budget",
                                       registry=r)
        self.cache_entries = Gauge(f"{PREFIX}_head_cache_entries", "Heads in the cache", registry=r)
        self.cache_bytes = Gauge(f"{PREFIX}_head_cache_bytes", "Bytes of heads in the cache", registry=r)
        self.solve_duration = Histogram(
            f"{PREFIX}_head_solve_duration_seconds", "Time of one batched head solve", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(f"{PREFIX}_rejections", "Requests refused before the model, by reason", ["reason"],
                                  registry=r)
        self.build_info = Gauge(
            f"{PREFIX}_build_info", "Constant 1; labels say what is served (the current bundle only)",
            ["version", "bundle_id", "device"], registry=r
        )
        self.ready = Gauge(f"{PREFIX}_ready",
                           "1 while /readyz answers 200 (warmed up, not draining), set at each scrape",
                           registry=r)
        self.reloads = Counter(f"{PREFIX}_bundle_reloads", "Bundle reloads by outcome: swapped, failed or busy",
                               ["outcome"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
