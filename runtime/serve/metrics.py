"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds; TTFT includes queueing and prefill, inter-token latency is one decode step of the batch
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Requests by route and status, tokens in and out, queue depth, running batch size, TTFT and
    inter-token latency histograms. The scheduler thread and the web app both write to it."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptedge_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.tokens_in = Counter("gptedge_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens_out = Counter("gptedge_generated_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("gptedge_cancelled_requests", "requests whose client left before the end "
                                 "(their row left the batch)", registry=r)
        self.queue = Gauge("gptedge_queue_depth", "requests waiting to join the batch", registry=r)
        self.batch = Gauge("gptedge_running_batch_size", "requests in the running batch", registry=r)
        self.ttft = Histogram("gptedge_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("gptedge_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=_ITL_BUCKETS, registry=r)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def prompt_tokens(self, n: int) -> None:
        self.tokens_in.inc(n)

    def first_token(self, seconds: float) -> None:
        self.tokens_out.inc()
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.tokens_out.inc()
        self.itl.observe(seconds)

    def cancel(self) -> None:
        self.cancelled.inc()

    def gauges(self, queue: int, running: int) -> None:
        self.queue.set(queue)
        self.batch.set(running)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
