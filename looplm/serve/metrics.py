"""The server's Prometheus metrics (``GET /metrics``), on a registry of their own per server.

Written with ``prometheus_client`` (the reference client library); names follow its
conventions: ``looplm_requests_total{outcome}`` (stop, length, error, cancelled),
``looplm_rejected_total`` (queue full), ``looplm_prompt_tokens_total``,
``looplm_generated_tokens_total``, ``looplm_draft_tokens_total`` and
``looplm_draft_accepted_total`` (speculative decoding's proposed and accepted draft tokens),
gauges ``looplm_queue_length``, ``looplm_running_requests``,
``looplm_prefilling_requests``, ``looplm_state_bytes`` (the decoding batch's state),
histograms ``looplm_batch_size`` (rows per decoding step),
``looplm_step_seconds``, ``looplm_time_to_first_token_seconds``, ``looplm_request_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Counters, gauges and histograms of one engine; :meth:`render` is the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("looplm_requests", "requests ended, by outcome", ["outcome"], registry=r)
        self.rejected = Counter("looplm_rejected", "requests refused because the queue was full", registry=r)
        self.prompt_tokens = Counter("looplm_prompt_tokens", "prompt tokens read", registry=r)
        self.generated_tokens = Counter("looplm_generated_tokens", "tokens generated", registry=r)
        self.draft_tokens = Counter("looplm_draft_tokens", "draft tokens proposed", registry=r)
        self.draft_accepted = Counter("looplm_draft_accepted", "draft tokens the model accepted", registry=r)
        self.queue = Gauge("looplm_queue_length", "requests waiting to start", registry=r)
        self.running = Gauge("looplm_running_requests", "requests in the decoding batch", registry=r)
        self.prefilling = Gauge("looplm_prefilling_requests", "requests whose prompt is being read",
                                registry=r)
        self.state_bytes = Gauge("looplm_state_bytes", "bytes of the decoding batch's state", registry=r)
        self.batch_size = Histogram("looplm_batch_size", "rows per decoding step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.step_seconds = Histogram("looplm_step_seconds", "seconds per decoding step", registry=r,
                                      buckets=_LATENCY)
        self.ttft = Histogram("looplm_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=_LATENCY)
        self.latency = Histogram("looplm_request_seconds", "arrival to the end of a request", registry=r,
                                 buckets=_LATENCY)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a Prometheus exposition text (comments skipped): for tests
    and the benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
