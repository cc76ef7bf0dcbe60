"""``ferry report`` without a Prometheus server: no data writes no PNG, and the legend covers no deploy's label."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.core.records import DeployReport, utc_stamp
from ferry.observability import report
from unit.support import Bench


def _prometheus(results: list[dict]) -> Iterator[str]:
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": results}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def empty() -> Iterator[str]:
    yield from _prometheus([])


@pytest.fixture
def quiet() -> Iterator[str]:
    """A version whose p95 is NaN all along (no request) and whose series has no other value."""
    now = time.time()
    yield from _prometheus([{"metric": {"version": "1"}, "values": [[now - 60, "NaN"], [now, "NaN"]]}])


def _deployed(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()


@pytest.mark.parametrize("source", ["empty", "quiet"])
def test_no_data_writes_no_png(bench: Bench, tmp_path: Path, source: str, request: pytest.FixtureRequest) -> None:
    _deployed(bench)
    out = tmp_path / "report.png"
    summary = report.write_report(request.getfixturevalue(source), bench.model_dir, out)
    assert summary.path is None and summary.points == 0 and summary.deploys == 1
    assert not out.exists(), "an empty PNG would look like a quiet model"


def _data(deploys: int = 3) -> report.ReportData:
    """A model's first deploys, a few minutes apart, with a latency and a traffic series per version. Its series
    start at the first deploy (Triton served nothing before), so that deploy's line and label are at the left
    edge, where a legend in the upper left corner sat."""
    start = time.time() - 3600
    times = [start + report.MARGIN_S + 300 * i for i in range(deploys)]
    recent = [DeployReport(deploy_id=f"d{i}", model="iris", kind="deploy", target="@champion", version=i + 1,
                           outcome="committed" if i % 2 == 0 else "rolled_back", failed_step="smoke",
                           started_at_utc=utc_stamp()) for i in range(deploys)]
    stamps = [dt.datetime.fromtimestamp(times[0] + 30 * k, dt.UTC) for k in range(100)]
    latency = [report.Series(f"v{v}", stamps, [5.0 + v for _ in stamps]) for v in (1, 2, 3)]
    traffic = [report.Series(f"v{v}", stamps, [10.0 * v for _ in stamps]) for v in (1, 2, 3)]
    return report.ReportData("iris", recent, times, latency, traffic, start, time.time())


def test_the_legend_covers_no_deploys_label() -> None:
    figure = report.draw(_data())
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    top = figure.axes[0]
    legend = top.get_legend().get_window_extent(renderer)
    labels = [text.get_window_extent(renderer) for text in top.texts]
    assert labels, "each deploy is labelled"
    covered = [text.get_text() for text, box in zip(top.texts, labels) if legend.overlaps(box)]
    assert not covered, f"the legend covers {covered}"
    assert not legend.overlaps(top.get_window_extent(renderer)), "the legend sits beside the plot, not on it"
    width, _ = figure.get_size_inches() * figure.dpi
    assert legend.x1 <= width, "and inside the picture"


def test_with_data_the_png_is_written(bench: Bench, tmp_path: Path) -> None:
    _deployed(bench)
    now = time.time()
    series = [{"metric": {"version": "1"}, "values": [[now - 60, "0.004"], [now, "0.005"]]}]
    for url in _prometheus(series):
        summary = report.write_report(url, bench.model_dir, tmp_path / "r.png")
    assert summary.path == tmp_path / "r.png" and summary.points == 4  # two series (latency, traffic) of two
    assert summary.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
