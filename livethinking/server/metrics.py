"""Prometheus metrics of one server, in a registry of its own (never the global default).

Latencies are measured by the server: time to first token runs from the moment the
request was received to the moment its first token reached the HTTP layer; time per
output token is (last token − first token) / (tokens − 1) of the longest choice. Engine
gauges (queue lengths, KV blocks, prefix-cache hit rate, preemptions) are read at scrape
time, with the server's own count of HTTP requests in flight.
"""

from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

from livethinking.engine.outputs import RequestOutput

__all__ = ["CONTENT_TYPE_LATEST", "RequestTracker", "ServerMetrics"]

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    """The server's metrics; ``render(stats)`` refreshes the engine gauges and exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "livethinking_time_to_first_token_seconds",
            "Seconds from request receipt to its first generated token", buckets=_TTFT_BUCKETS,
            registry=r)
        self.time_per_output_token = Histogram(
            "livethinking_time_per_output_token_seconds",
            "Seconds per generated token after the first", buckets=_TPOT_BUCKETS, registry=r)
        self.requests_finished = Counter(
            "livethinking_requests_finished", "Finished choices, by finish reason "
            "(abort: the client went away)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("livethinking_prompt_tokens",
                                     "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("livethinking_generation_tokens",
                                         "Tokens generated and sent", registry=r)
        self.num_requests_waiting = Gauge("livethinking_num_requests_waiting",
                                          "Requests queued in the engine", registry=r)
        self.num_requests_running = Gauge("livethinking_num_requests_running",
                                          "Requests the engine is decoding", registry=r)
        self.kv_blocks_used = Gauge("livethinking_kv_blocks_used", "KV-cache blocks in use",
                                    registry=r)
        self.kv_blocks_total = Gauge("livethinking_kv_blocks_total", "KV-cache blocks in all",
                                     registry=r)
        self.prefix_cache_hit_rate = Gauge(
            "livethinking_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens looked up", registry=r)
        self.num_requests_in_flight = Gauge(
            "livethinking_num_requests_in_flight",
            "Generation requests the server holds (admitted, not yet answered)", registry=r)
        self.num_preemptions = Counter(
            "livethinking_num_preemptions",
            "Sequences the engine preempted (KV blocks freed, recomputed later)", registry=r)
        self._preemptions_seen = 0

    def track(self, received: float) -> RequestTracker:
        """A tracker for one request received at ``received`` (``time.perf_counter()``)."""
        return RequestTracker(self, received)

    def render(self, stats, in_flight: int = 0) -> bytes:
        """The Prometheus text exposition, engine gauges taken from ``stats`` (EngineStats)
        and ``in_flight`` the server's requests in flight."""
        self.num_requests_in_flight.set(in_flight)
        if stats.num_preemptions > self._preemptions_seen:  # the engine's count is cumulative
            self.num_preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
        self.num_requests_waiting.set(stats.num_waiting)
        self.num_requests_running.set(stats.num_running)
        self.kv_blocks_used.set(stats.kv_blocks_total - stats.kv_blocks_free)
        self.kv_blocks_total.set(stats.kv_blocks_total)
        self.prefix_cache_hit_rate.set(stats.prefix_cache_hit_rate)
        return generate_latest(self.registry)


class RequestTracker:
    """Observes one request's outputs as they reach the HTTP layer."""

    def __init__(self, metrics: ServerMetrics, received: float) -> None:
        self._metrics = metrics
        self._received = received
        self._first: float | None = None
        self._last: float | None = None
        self._last_output: RequestOutput | None = None
        self._closed = False

    def observe(self, output: RequestOutput) -> None:
        """Record an output (call for each one, in order)."""
        now = time.perf_counter()
        if self._last_output is None:
            self._metrics.prompt_tokens.inc(len(output.prompt_token_ids))
        if self._first is None and any(c.token_ids for c in output.outputs):
            self._first = now
            self._metrics.time_to_first_token.observe(now - self._received)
        self._last = now
        self._last_output = output

    def close(self) -> None:
        """Record the finish (choices still running count as ``abort``); idempotent."""
        if self._closed or self._last_output is None:
            self._closed = True
            return
        self._closed = True
        m = self._metrics
        choices = self._last_output.outputs
        m.generation_tokens.inc(sum(len(c.token_ids) for c in choices))
        for choice in choices:
            m.requests_finished.labels(finish_reason=choice.finish_reason or "abort").inc()
        longest = max((len(c.token_ids) for c in choices), default=0)
        if longest > 1 and self._first is not None and self._last is not None:
            m.time_per_output_token.observe((self._last - self._first) / (longest - 1))
