"""The service's Prometheus metrics, in a registry of its own (no process-global state).

    stnpadim_requests_total{status}      /v1/score requests answered, by HTTP status
                                         ("499": the client left before its answer)
    stnpadim_request_seconds             /v1/score latency, arrival to answer (histogram)
    stnpadim_batch_size                  images per model call (histogram)
    stnpadim_batch_seconds               time of one model call (histogram)
    stnpadim_queue_depth                 requests admitted and not yet in a batch
    stnpadim_images_scored_total         images the model scored
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds): a 10 ms wait plus a CPU batch lands in the tens to hundreds of
# milliseconds; a queue under overload in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters and histograms of one service.

    Args:
        max_batch: the largest batch (the batch-size buckets are powers of 2 up to it).
        queue_depth: callable giving the current queue depth (read at each scrape).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int, queue_depth: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("stnpadim_requests", "Scoring requests (/v1/score) answered, by HTTP "
                                "status; 499: the client left first", ["status"], registry=self.registry)
        self.latency = Histogram("stnpadim_request_seconds", "Scoring request latency, arrival to answer",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        sizes = sorted({2 ** k for k in range(max_batch.bit_length()) if 2 ** k < max_batch} | {max_batch})
        self.batch_size = Histogram("stnpadim_batch_size", "Images per model call", buckets=sizes,
                                    registry=self.registry)
        self.batch_seconds = Histogram("stnpadim_batch_seconds", "Duration of one model call",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("stnpadim_queue_depth", "Requests admitted and not yet in a batch",
                                 registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.images = Counter("stnpadim_images_scored", "Images scored by the model", registry=self.registry)

    def request(self, status: int, seconds: float) -> None:
        """Records one answered (or abandoned) scoring request."""
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        """Records one model call."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
