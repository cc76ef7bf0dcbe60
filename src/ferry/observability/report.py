"""``ferry report``: latency and traffic around a model's recent deploys, as a PNG, each deploy marked.

The series come from Prometheus (the recording rules of ops/prometheus); the deploys from the
model's history, so a deploy shows on the plot even if no scrape caught its metrics.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.core.current import read_history
from ferry.core.records import Outcome, parse_utc_stamp
from ferry.core.repository import ModelDir
from ferry.observability.prometheus import query

MARGIN_S = 600  # shown before the first deploy of the report
MARKED = {Outcome.COMMITTED: ("tab:green", "-"), Outcome.ROLLED_BACK: ("tab:red", "--")}


@dataclass
class Series:
    label: str
    times: list[dt.datetime]
    values: list[float]


@dataclass
class ReportSummary:
    path: Path
    deploys: int
    points: int


def _query_range(prometheus_url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    return query(prometheus_url, "query_range", 10.0, query=expr, start=start, end=end, step=step)


def _series(results: list[dict], scale: float) -> list[Series]:
    return [Series(f"v{r['metric'].get('version', '?')}",
                   [dt.datetime.fromtimestamp(t, dt.UTC) for t, _ in r["values"]],
                   [float(v) * scale for _, v in r["values"]]) for r in results]


def write_report(prometheus_url: str, model_dir: ModelDir, out: Path, deploys: int = 5) -> ReportSummary:
    """Plot p95 latency and request rate per version from before the last ``deploys`` deploys until now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recent = [r for r in read_history(model_dir) if r.get("outcome") in MARKED][-deploys:]
    end = time.time()
    times = [parse_utc_stamp(r.get("finished_at_utc") or r["started_at_utc"]).timestamp() for r in recent]
    start = (min(times) if times else end - 3600) - MARGIN_S
    step = max(1.0, (end - start) / 600)
    selector = f'{{model="{model_dir.model}"}}'
    latency = _series(_query_range(prometheus_url, f"model_version:triton_request_latency_seconds:p95{selector}",
                                   start, end, step), 1000.0)
    traffic = _series(_query_range(prometheus_url, f"model_version:triton_requests:rate1m{selector}",
                                   start, end, step), 1.0)

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5))
    for axis, lines, ylabel in ((top, latency, "p95 latency (ms)"), (bottom, traffic, "requests / s")):
        for line in lines:
            axis.plot(line.times, line.values, label=line.label, linewidth=1.4)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        for record, at in zip(recent, times, strict=False):
            colour, style = MARKED[record["outcome"]]
            axis.axvline(dt.datetime.fromtimestamp(at, dt.UTC), color=colour, linestyle=style, linewidth=1)
    for record, at in zip(recent, times, strict=False):
        colour, _ = MARKED[record["outcome"]]
        what = "committed" if record["outcome"] == Outcome.COMMITTED else f"rolled back ({record.get('failed_step')})"
        top.annotate(f"v{record.get('version')} {what}", (dt.datetime.fromtimestamp(at, dt.UTC), 1.0),
                     xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8, color=colour)
    if latency:
        top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{model_dir.model}: latency and traffic around the last {len(recent)} deploys")
    bottom.set_xlabel("UTC")
    figure.autofmt_xdate()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return ReportSummary(out, len(recent), sum(len(s.values) for s in latency + traffic))
