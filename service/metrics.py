"""Prometheus metrics of the service, in base units (seconds, images). Names are listed in docs/metrics-and-logs.md.

Each app gets its own registry (several apps in one process, as in tests, do not collide); the
process and Python collectors are added to it so ``/metrics`` has what the default registry would.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

disable_created_metrics()  # the *_created series only add noise to every scrape

# Request latency on a CPU spans ~10 ms (tiny model) to tens of seconds (big model, big image, deep queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REJECTION_REASONS = (
    "queue_full",
    "over_memory",
    "too_many_uploads",
    "not_ready",
    "timeout",
    "draining",
    "too_large",
    "unsupported_media_type",
    "bad_image",
    "bad_request",
    "disconnected",
    "unauthorized",
    "not_found",
)


class Metrics:
    """The service's metrics, registered in ``self.registry``."""

    def __init__(self, max_batch_size: int):
        r = self.registry = CollectorRegistry(auto_describe=True)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.requests = Counter(
            "m2f_requests",
            "Segmentation requests answered, by model, task and HTTP status code",
            ["model", "task", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "m2f_request_duration_seconds",
            "Request received -> response ready",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "m2f_queue_duration_seconds",
            "Request admitted -> its batch starts",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "m2f_inference_duration_seconds",
            "Model forward pass of one batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.postprocess_duration = Histogram(
            "m2f_postprocess_duration_seconds",
            "Post-processing and RLE encoding of one request",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        sizes = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, max_batch_size})
        self.batch_size = Histogram(
            "m2f_batch_size",
            "Images per forward pass",
            ["model"],
            buckets=[s for s in sizes if s <= max_batch_size],
            registry=r,
        )
        self.queue_depth = Gauge("m2f_queue_depth", "Requests admitted and waiting for a batch", registry=r)
        self.inflight = Gauge("m2f_inflight_requests", "Requests admitted and not yet answered", registry=r)
        self.rejections = Counter("m2f_rejections", "Requests refused or dropped, by reason", ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # every reason shows from the start, at 0
        self.ready = Gauge(
            "m2f_ready", "1 when the model is loaded and warmed up and the server is not draining", registry=r
        )
        self.model_info = Gauge(
            "m2f_model_info",
            "The served models and versions (always 1; a draining version's series goes once it is unloaded)",
            ["model", "version", "checkpoint", "runtime"],
            registry=r,
        )
