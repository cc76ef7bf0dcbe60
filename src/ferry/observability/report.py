"""``ferry report``: latency and traffic around a model's recent deploys, as a PNG, each deploy marked.

The series come from Prometheus (the recording rules of ops/prometheus); the deploys from the
model's history, so a deploy shows on the plot even if no scrape caught its metrics.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.core.current import read_attempts
from ferry.core.records import DeployReport, Outcome, parse_utc_stamp
from ferry.core.repository import ModelDir
from ferry.observability.prometheus import query

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MARGIN_S = 600  # shown before the first deploy of the report
MARKED = {Outcome.COMMITTED: ("tab:green", "-"), Outcome.ROLLED_BACK: ("tab:red", "--")}


@dataclass
class Series:
    label: str
    times: list[dt.datetime]
    values: list[float]


@dataclass
class ReportSummary:
    path: Path | None  # None when there was nothing to draw: no PNG is written
    deploys: int
    points: int
    start: float = 0.0
    end: float = 0.0


@dataclass
class ReportData:
    model: str
    recent: list[DeployReport]  # the deploys to mark, oldest first
    times: list[float]  # when each one finished (epoch seconds)
    latency: list[Series]
    traffic: list[Series]
    start: float
    end: float

    @property
    def points(self) -> int:
        """The values that can be drawn (Prometheus gives NaN for a p95 over no requests)."""
        return sum(math.isfinite(v) for s in self.latency + self.traffic for v in s.values)


def _query_range(prometheus_url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    return query(prometheus_url, "query_range", 10.0, query=expr, start=start, end=end, step=step)


def _series(results: list[dict], scale: float) -> list[Series]:
    return [Series(f"v{r['metric'].get('version', '?')}",
                   [dt.datetime.fromtimestamp(t, dt.UTC) for t, _ in r["values"]],
                   [float(v) * scale for _, v in r["values"]]) for r in results]


def gather(prometheus_url: str, model_dir: ModelDir, deploys: int = 5) -> ReportData:
    """The series per version from before the last ``deploys`` deploys until now, and those deploys."""
    recent = [r for r in read_attempts(model_dir) if r.outcome in MARKED][-deploys:]
    end = time.time()
    times = [parse_utc_stamp(r.finished_at_utc or r.started_at_utc).timestamp() for r in recent]
    start = (min(times) if times else end - 3600) - MARGIN_S
    step = max(1.0, (end - start) / 600)
    selector = f'{{model="{model_dir.model}"}}'
    latency = _series(_query_range(prometheus_url, f"model_version:request_latency_seconds:p95{selector}",
                                   start, end, step), 1000.0)
    traffic = _series(_query_range(prometheus_url, f"model_version:triton_requests:rate1m{selector}",
                                   start, end, step), 1.0)
    return ReportData(model_dir.model, recent, times, latency, traffic, start, end)


def draw(data: ReportData) -> Figure:
    """The two panels, each deploy marked; the legend beside the plot, where no deploy's label can be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5))
    for axis, lines, ylabel in ((top, data.latency, "p95 latency (ms)"), (bottom, data.traffic, "requests / s")):
        for line in lines:
            axis.plot(line.times, line.values, label=line.label, linewidth=1.4)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        for record, at in zip(data.recent, data.times, strict=False):
            colour, style = MARKED[record.outcome]
            axis.axvline(dt.datetime.fromtimestamp(at, dt.UTC), color=colour, linestyle=style, linewidth=1)
    for record, at in zip(data.recent, data.times, strict=False):
        colour, _ = MARKED[record.outcome]
        what = "committed" if record.outcome == Outcome.COMMITTED else f"rolled back ({record.failed_step})"
        top.annotate(f"v{record.version} {what}", (dt.datetime.fromtimestamp(at, dt.UTC), 1.0),
                     xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8, color=colour)
    if data.latency:
        # Outside the axes: inside, "upper left" sat on the first deploy's label (it is MARGIN_S from the left).
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, title="version")
    top.set_title(f"{data.model}: latency and traffic around the last {len(data.recent)} deploys")
    bottom.set_xlabel("UTC")
    figure.autofmt_xdate()
    figure.tight_layout()
    return figure


def write_report(prometheus_url: str, model_dir: ModelDir, out: Path, deploys: int = 5) -> ReportSummary:
    """Plot p95 latency and request rate per version from before the last ``deploys`` deploys until now.
    With no point to draw, nothing is written (``path`` None): an empty PNG would look like a quiet model."""
    data = gather(prometheus_url, model_dir, deploys)
    if not data.points:
        return ReportSummary(None, len(data.recent), 0, data.start, data.end)
    import matplotlib.pyplot as plt

    figure = draw(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return ReportSummary(out, len(data.recent), data.points, data.start, data.end)
