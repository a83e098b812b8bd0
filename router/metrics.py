"""Prometheus metrics of the router, in one registry per process.

Gauges that mirror state (queue, batch, KV blocks) are read at scrape time through
callbacks, so the batching loop pays nothing for them; counters and histograms are
updated where the event happens.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets from 1 ms to about 2 minutes; token-count buckets by powers of two.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 120.0)
_TOKENS = tuple(float(2**i) for i in range(0, 18))
_BATCH = tuple(float(2**i) for i in range(0, 10))

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the router exports; `render()` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Requests
        self.requests = Counter("shardgen_requests", "Requests finished, by outcome.",
                                ["outcome"], registry=r)
        self.request_duration = Histogram(
            "shardgen_request_duration_seconds", "Time from arrival to the last token.",
            buckets=_SECONDS, registry=r)
        self.queue_duration = Histogram(
            "shardgen_request_queue_duration_seconds", "Time a request waited before its prefill.",
            buckets=_SECONDS, registry=r)
        self.validation_duration = Histogram(
            "shardgen_request_validation_duration_seconds",
            "Time from arrival to the request validated and tokenized (handed to the engine next).",
            buckets=_SECONDS, registry=r)
        self.time_to_first_token = Histogram(
            "shardgen_time_to_first_token_seconds", "Time from arrival to the first token.",
            buckets=_SECONDS, registry=r)
        self.inter_token_latency = Histogram(
            "shardgen_inter_token_latency_seconds", "Time between two tokens of a request.",
            buckets=_SECONDS, registry=r)
        self.input_tokens = Histogram("shardgen_request_input_tokens", "Prompt tokens per request.",
                                      buckets=_TOKENS, registry=r)
        self.generated_tokens = Histogram(
            "shardgen_request_generated_tokens", "Generated tokens per request.",
            buckets=_TOKENS, registry=r)
        self.prompt_tokens = Counter("shardgen_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generated_tokens_total = Counter("shardgen_generated_tokens", "Tokens generated.",
                                              registry=r)
        # Batching
        self.batch_size = Histogram("shardgen_batch_size", "Requests per step.", ["method"],
                                    buckets=_BATCH, registry=r)
        self.forward_duration = Histogram(
            "shardgen_batch_forward_duration_seconds",
            "Forward pass time per step, as the shards measured it.", ["method"],
            buckets=_SECONDS, registry=r)
        self.step_duration = Histogram(
            "shardgen_batch_step_duration_seconds",
            "Step time seen by the router (gRPC round trip included).", ["method"],
            buckets=_SECONDS, registry=r)
        self.preemptions = Counter("shardgen_preemptions", "Requests preempted for KV blocks.",
                                   registry=r)
        self.step_failures = Counter(
            "shardgen_step_failures", "Steps the shards failed, by gRPC status.", ["code"],
            registry=r)
        self.fault_requeues = Counter(
            "shardgen_fault_requeues",
            "Requests of a failed step recomputed instead of failed (fault isolation).",
            registry=r)
        self.prefix_hit_tokens = Counter("shardgen_prefix_cache_hit_tokens",
                                         "Prompt tokens served from the prefix cache.", registry=r)
        # State, read at scrape time
        self.queue_size = Gauge("shardgen_queue_size", "Requests waiting.", registry=r)
        self.batch_current_size = Gauge("shardgen_batch_current_size", "Requests decoding.",
                                        registry=r)
        self.kv_blocks_total = Gauge("shardgen_kv_blocks_total", "KV blocks requests may use.",
                                     registry=r)
        self.kv_blocks_used = Gauge("shardgen_kv_blocks_used", "KV blocks held by requests.",
                                    registry=r)
        self.kv_blocks_cached = Gauge("shardgen_kv_blocks_cached",
                                      "Unreferenced KV blocks kept for prefix reuse.", registry=r)

    def bind_state(self, *, queue_size: Callable[[], float], batch_size: Callable[[], float],
                   kv_blocks_total: Callable[[], float], kv_blocks_used: Callable[[], float],
                   kv_blocks_cached: Callable[[], float]) -> None:
        """Point the state gauges at the functions that read the live values."""
        self.queue_size.set_function(queue_size)
        self.batch_current_size.set_function(batch_size)
        self.kv_blocks_total.set_function(kv_blocks_total)
        self.kv_blocks_used.set_function(kv_blocks_used)
        self.kv_blocks_cached.set_function(kv_blocks_cached)

    def render(self) -> bytes:
        return generate_latest(self.registry)
