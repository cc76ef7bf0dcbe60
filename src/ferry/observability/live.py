"""The live p95 latency and failure ratio of a model version: from Prometheus when one is configured
(the recording rules of ops/prometheus, over the last minutes), else from Triton's metrics endpoint
(its latency summary, and failures over every request since the version was loaded)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ferry.core.config import Settings
from ferry.core.errors import PrometheusError
from ferry.core.status import LiveFigures
from ferry.observability.prometheus import query_scalar

TIMEOUT_S = 3.0


def live_figures(settings: Settings, model: str, version: int) -> LiveFigures:
    if settings.prometheus_url:
        return from_prometheus(settings.prometheus_url, model, version)
    return from_triton(settings.triton.metrics_url, model, version)


def from_prometheus(prometheus_url: str, model: str, version: int) -> LiveFigures:
    labels = f'model="{model}",version="{version}"'
    try:
        p95 = query_scalar(prometheus_url, f"max(model_version:request_latency_seconds:p95{{{labels}}})",
                           TIMEOUT_S)
        ratio = query_scalar(prometheus_url, f"max(model_version:triton_failure_ratio:rate5m{{{labels}}})",
                             TIMEOUT_S)
    except PrometheusError as error:
        return LiveFigures(source="prometheus", error=error.message)
    return LiveFigures(p95_ms=None if p95 is None else p95 * 1000, failure_ratio=ratio, source="prometheus (5m)")


def from_triton(metrics_url: str, model: str, version: int) -> LiveFigures:
    try:
        with urllib.request.urlopen(metrics_url, timeout=TIMEOUT_S) as reply:
            text = reply.read().decode()
    except OSError as error:
        return LiveFigures(source="triton", error=f"Triton's metrics at {metrics_url} did not answer: {error}")
    p95_us, success, failure = None, 0.0, 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model or sample.labels.get("version") != str(version):
                continue
            if sample.name == "nv_inference_request_summary_us" and sample.labels.get("quantile") == "0.95":
                p95_us = sample.value
            elif sample.name in ("nv_inference_request_success_total", "nv_inference_request_success"):
                success += sample.value
            elif sample.name in ("nv_inference_request_failure_total", "nv_inference_request_failure"):
                failure += sample.value
    total = success + failure
    return LiveFigures(p95_ms=None if p95_us is None else p95_us / 1000,
                       failure_ratio=failure / total if total else None, source="triton (since load)")
