"""Prometheus metrics of one server: scheduler occupancy (read at scrape time) and latencies.

Names (the HPA in deploy/k8s scales on ``portable_infer_requests_waiting``)::

    portable_infer_requests_running            gauge      admitted requests (prefilling or decoding)
    portable_infer_requests_waiting            gauge      queued for a slot or KV blocks
    portable_infer_kv_blocks_used / _total     gauge      KV blocks of block_size tokens
    portable_infer_kv_cache_bytes              gauge      KV the batch holds now
    portable_infer_tokens_per_second           gauge      generated tokens/s, last 10 s
    portable_infer_prompt_tokens_total         counter    tokens in
    portable_infer_prefix_cache_hits_total     counter    requests started from a cached prompt prefix
    portable_infer_prefix_cache_tokens_total   counter    prompt tokens those did not prefill
    portable_infer_prefix_cache_bytes          gauge      host memory the cached prefixes hold
    portable_infer_generation_tokens_total     counter    tokens out
    portable_infer_requests_total{outcome}     counter    finished | cancelled | rejected | failed
    portable_infer_engine_seconds_total{phase,part} counter  the step loop's time: phase prefill |
                                                          decode (part forward: waiting on the engine's
                                                          forwards; host: the rest), plan | idle
    portable_infer_engine_steps_total{phase}   counter    prefill | decode | mixed steps (mixed: decode steps a
                                                          prefill rode in, paged KV; counted in decode too)
    portable_infer_decode_rows_total           counter    rows decoded, summed over decode steps
    portable_infer_time_to_first_token_seconds histogram
    portable_infer_inter_token_latency_seconds histogram
    portable_infer_request_duration_seconds    histogram
    portable_infer_http_responses_total{path,status} counter
    portable_infer_http_requests_in_flight     gauge      /v1 requests admitted and not yet answered
    portable_infer_shutting_down               gauge      1 from SIGTERM until exit (/ready answers 503)
    portable_infer_http_connections            gauge      open client connections
    portable_infer_http_connections_dropped_total{reason} counter  idle | slow_request | slow_reader
                                                          | evicted | over_limit (server/connections.py)
"""

from __future__ import annotations

from portable_infer.serving.scheduler import SchedulerObserver

PREFIX = "portable_infer"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# gauge name -> (help, how to read it from SchedulerStats)
GAUGES = {
    "requests_running": ("Requests admitted (prefilling or decoding)", lambda s: s.running + s.prefilling),
    "requests_waiting": ("Requests queued for a slot or KV blocks", lambda s: s.waiting),
    "kv_blocks_used": ("KV blocks reserved by admitted requests", lambda s: s.blocks_used),
    "kv_blocks_total": ("KV blocks in the budget", lambda s: s.blocks_total),
    "kv_cache_bytes": ("KV bytes the running batch really holds (CPU static buffers: positions written; "
                       "GPU: whole buffers; padding included)", lambda s: s.kv_bytes),
    "tokens_per_second": ("Generated tokens per second over the last 10 s", lambda s: s.tokens_per_s),
    "max_batch": ("Requests that may run at once", lambda s: s.max_batch),
    "prefix_cache_bytes": ("Host memory the cached prompt prefixes hold", lambda s: s.prefix_cache_bytes),
}
COUNTERS = {
    "prompt_tokens": ("Prompt tokens prefilled", lambda s: s.prompt_tokens),
    "generation_tokens": ("Tokens generated", lambda s: s.generation_tokens),
    "prefix_cache_hits": ("Requests that started from a cached prompt prefix", lambda s: s.prefix_cache_hits),
    "prefix_cache_tokens": ("Prompt tokens reused from cached prefixes (not prefilled)",
                            lambda s: s.prefix_cache_tokens),
    "requests_preempted": ("Times a running request gave its KV blocks back and waited to be recomputed (paged KV)",
                           lambda s: s.requests_preempted),
}
OUTCOMES = {"finished": "requests_finished", "cancelled": "requests_cancelled",
            "rejected": "requests_rejected", "failed": "requests_failed"}


class _StatsCollector:
    """Reads the scheduler's stats at each scrape (and the server's own capacity 429s, ``admission``)."""

    def __init__(self, scheduler, admission=None):
        self.scheduler, self.admission = scheduler, admission

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.scheduler.stats()
        for name, (doc, read) in GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=read(s))
        for name, (doc, read) in COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=read(s))
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Requests by outcome", labels=["outcome"])
        for outcome, field in OUTCOMES.items():
            extra = self.admission.rejected if outcome == "rejected" and self.admission is not None else 0
            requests.add_metric([outcome], getattr(s, field) + extra)
        yield requests
        yield from _step_metrics(s.steps)


def _step_metrics(steps: dict):
    """The step loop's clock (``SchedulerStats.steps``) as counters: mean decode batch = rows /
    steps, and forward against host seconds say whether the device or the host bounds a step."""
    from prometheus_client.core import CounterMetricFamily

    seconds = CounterMetricFamily(f"{PREFIX}_engine_seconds", "The step loop's seconds by phase and part",
                                  labels=["phase", "part"])
    for phase in ("prefill", "decode"):
        for part in ("forward", "host"):
            seconds.add_metric([phase, part], steps.get(f"{phase}_{part}", 0.0))
    for phase in ("plan", "idle"):
        seconds.add_metric([phase, ""], steps.get(phase, 0.0))
    yield seconds
    count = CounterMetricFamily(f"{PREFIX}_engine_steps", "Steps of the step loop by phase", labels=["phase"])
    for phase in ("prefill", "decode", "mixed"):
        count.add_metric([phase], steps.get(f"{phase}_steps", 0))
    yield count
    yield CounterMetricFamily(f"{PREFIX}_decode_rows", "Rows decoded, summed over decode steps",
                              value=steps.get("decode_rows", 0))


class _ServerCollector:
    """Reads the HTTP side at each scrape: requests in flight, shutdown, connections."""

    def __init__(self, lifecycle, connections):
        self.lifecycle, self.connections = lifecycle, connections

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self.lifecycle is not None:
            yield GaugeMetricFamily(f"{PREFIX}_http_requests_in_flight", "/v1 requests admitted and not yet "
                                    "answered", value=self.lifecycle.in_flight)
            yield GaugeMetricFamily(f"{PREFIX}_shutting_down", "1 while the server drains before exiting",
                                    value=int(self.lifecycle.draining))
        if self.connections is not None:
            yield GaugeMetricFamily(f"{PREFIX}_http_connections", "Open client connections",
                                    value=self.connections.open)
            dropped = CounterMetricFamily(f"{PREFIX}_http_connections_dropped", "Connections the server closed "
                                          "for a limit or timeout, by reason", labels=["reason"])
            for reason in ("idle", "slow_request", "slow_reader", "evicted", "over_limit"):
                dropped.add_metric([reason], self.connections.closed[reason])
            yield dropped


class Metrics(SchedulerObserver):
    """A registry of its own (several apps may live in one process) fed by the scheduler, and
    optionally by the server's :class:`~.lifecycle.Lifecycle` and :class:`~.connections.ConnectionGuard`."""

    def __init__(self, scheduler, *, lifecycle=None, connections=None, admission=None):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "Time from arrival to the last token",
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.http = Counter(f"{PREFIX}_http_responses", "HTTP responses by path and status",
                            ["path", "status"], registry=self.registry)
        self.registry.register(_StatsCollector(scheduler, admission))
        if lifecycle is not None or connections is not None:
            self.registry.register(_ServerCollector(lifecycle, connections))
        scheduler.add_observer(self)

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, stats) -> None:
        self.duration.observe(stats.total_s)

    def render(self) -> tuple:
        """(body bytes, content type) of the Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
