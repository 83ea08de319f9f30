"""What the first process serves as /metrics and statistics with --frontends: every process's counts added."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.api.views import merge_metrics, merge_statistics
from service.metrics import Metrics
from service.stats import ModelStatistics


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_counters_histograms_and_queue_gauges_add_up_and_partition_gauges_are_the_first_process_s() -> None:
    first, other = Metrics(), Metrics()
    for metrics, requests, seconds in ((first, 3, 0.002), (other, 5, 0.2)):
        for _ in range(requests):
            metrics.request_done("face-pros", "200", seconds)
        metrics.batch_size.labels("face-pros", "gpu-0").observe(requests)
        metrics.queue_depth.labels("face-pros").set(requests)
        metrics.ready.labels("gpu-0").set(1)
        metrics.restarts.labels("gpu-0").set(2)
    other.request_done("face-pros", "504", 30.0)  # a series only the other process has
    merged = _samples(merge_metrics(generate_latest(first.registry), [generate_latest(other.registry)]))
    assert merged["migserve_requests_total", (("model", "face-pros"), ("status", "200"))] == 8
    assert merged["migserve_requests_total", (("model", "face-pros"), ("status", "504"))] == 1
    assert merged["migserve_request_seconds_count", (("model", "face-pros"),)] == 9
    assert merged["migserve_request_seconds_bucket", (("le", "0.0025"), ("model", "face-pros"))] == 3
    assert merged["migserve_request_seconds_bucket", (("le", "0.25"), ("model", "face-pros"))] == 8
    assert abs(merged["migserve_request_seconds_sum", (("model", "face-pros"),)] - (3 * 0.002 + 5 * 0.2 + 30)) < 1e-9
    assert merged["migserve_batch_size_count", (("model", "face-pros"), ("partition", "gpu-0"))] == 2
    assert merged["migserve_queue_depth", (("model", "face-pros"),)] == 8, "requests queued in every process"
    assert merged["migserve_partition_ready", (("partition", "gpu-0"),)] == 1, "not one per process"
    assert merged["migserve_worker_restarts", (("partition", "gpu-0"),)] == 2
    alone = generate_latest(first.registry)
    assert _samples(merge_metrics(alone, [])) == _samples(alone), "with no other front-end: the first's own"


def test_statistics_add_up_per_model_and_batch_size() -> None:
    first, other = ModelStatistics("crowd-csrnet"), ModelStatistics("crowd-csrnet")
    first.request_done(True, 0.01)
    first.batch_done(2, [0.001, 0.002], 0.0001, 0.004, 0.0002)
    other.request_done(True, 0.02)
    other.request_done(False, 0.5)
    other.batch_done(2, [0.003], 0.0001, 0.005, 0.0002)
    other.batch_done(4, [0.001], 0.0001, 0.006, 0.0002)
    total = merge_statistics(first, [other]).message()
    assert total.inference_count == 8 and total.execution_count == 3
    assert total.inference_stats.success.count == 2 and total.inference_stats.fail.count == 1
    assert total.inference_stats.queue.count == 4
    assert [(b.batch_size, b.compute_infer.count) for b in total.batch_stats] == [(2, 2), (4, 1)]
    assert total.last_inference == max(first.last_inference_ms, other.last_inference_ms)
    assert first.inference_count == 2, "the process's own statistics are left as they were"
