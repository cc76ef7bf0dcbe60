"""Prometheus' HTTP query API, as ``ferry status`` and ``ferry report`` read it."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

from ferry.core.errors import PrometheusError


def query(prometheus_url: str, endpoint: str, timeout_s: float, **params: Any) -> list[dict]:
    """The ``result`` list of one call of ``/api/v1/<endpoint>`` (query or query_range)."""
    url = f"{prometheus_url.rstrip('/')}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return json.loads(reply.read())["data"]["result"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PrometheusError(f"Prometheus at {prometheus_url} did not answer {params.get('query')}: {error}",
                              "check FERRY_PROMETHEUS_URL, and that it loads ops/prometheus/rules") from None


def query_scalar(prometheus_url: str, expr: str, timeout_s: float) -> float | None:
    """The value of an instant query that selects one series; None when it selects none."""
    result = query(prometheus_url, "query", timeout_s, query=expr)
    return float(result[0]["value"][1]) if result else None
