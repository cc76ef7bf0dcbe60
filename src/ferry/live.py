"""The live p95 latency and failure ratio of a model version: from Prometheus when one is configured
(the recording rules of ops/prometheus, over the last minutes), else from Triton's metrics endpoint
(its latency summary, and failures over every request since the version was loaded)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from ferry.config import Settings
from ferry.runtime.server import metrics_url

TIMEOUT_S = 3.0


class LiveFigures(BaseModel):
    p95_ms: float | None = None
    failure_ratio: float | None = None
    source: str = ""  # "prometheus (5m)" or "triton (since load)"
    error: str | None = None


def live_figures(settings: Settings, model: str, version: int) -> LiveFigures:
    if settings.prometheus_url:
        return from_prometheus(settings.prometheus_url, model, version)
    return from_triton(metrics_url(settings), model, version)


def from_prometheus(prometheus_url: str, model: str, version: int) -> LiveFigures:
    def query(expr: str) -> float | None:
        url = f"{prometheus_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            result = json.loads(reply.read())["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    labels = f'model="{model}",version="{version}"'
    try:
        p95 = query(f"max(model_version:triton_request_latency_seconds:p95{{{labels}}})")
        ratio = query(f"max(model_version:triton_failure_ratio:rate5m{{{labels}}})")
    except (OSError, ValueError, KeyError) as error:
        return LiveFigures(source="prometheus", error=f"Prometheus at {prometheus_url} did not answer: {error}")
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
    return LiveFigures(p95_ms=None if p95_us is None else p95_us / 1000, failure_ratio=failure / total if total else None,
                       source="triton (since load)")
