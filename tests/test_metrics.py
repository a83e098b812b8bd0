"""The router's metrics render in the Prometheus text format and follow its conventions."""

from prometheus_client.parser import text_string_to_metric_families

from shardgen.router.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, float]:
    return {(s.name + str(sorted(s.labels.items())) if s.labels else s.name): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples}


def test_names_and_live_gauges() -> None:
    metrics = Metrics()
    state = {"queue": 3.0}
    metrics.bind_state(queue_size=lambda: state["queue"], batch_size=lambda: 2,
                       kv_blocks_total=lambda: 100, kv_blocks_used=lambda: 10,
                       kv_blocks_cached=lambda: 5)
    metrics.requests.labels(outcome="success").inc()
    metrics.prompt_tokens.inc(7)
    metrics.time_to_first_token.observe(0.02)
    samples = _samples(metrics)
    assert samples["shardgen_queue_size"] == 3.0
    assert samples["shardgen_kv_blocks_total"] == 100
    assert samples["shardgen_requests_total[('outcome', 'success')]"] == 1
    assert samples["shardgen_prompt_tokens_total"] == 7
    assert samples["shardgen_time_to_first_token_seconds_count"] == 1
    for name in ("shardgen_kv_blocks_used", "shardgen_prefix_cache_hit_tokens_total",
                 "shardgen_batch_current_size", "shardgen_preemptions_total"):
        assert name in samples
    state["queue"] = 0.0
    assert _samples(metrics)["shardgen_queue_size"] == 0.0
