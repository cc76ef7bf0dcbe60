"""The watcher's receiver decides on deliveries without a server: what it refuses, what it remembers across a
restart, and what it writes to its log (the HTTP server itself is tested in tests/test_watch.py)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import pytest

from ferry.adapters.watch import Trigger, Watch, read_or_create_secret, secret_path, sign
from ferry.core.config import Settings


class Recorder:
    via = "test"

    def __init__(self) -> None:
        self.calls: list[Trigger] = []

    def run(self, trigger: Trigger) -> tuple[str, str]:
        self.calls.append(trigger)
        return "committed", "recorded"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path, repository=tmp_path / "repository", tracking_uri="fake://mlflow")
    read_or_create_secret(secret_path(settings))
    return settings


def signed(settings: Settings, data: dict | None = None, *, delivery_id: str | None = None,
           **fields: object) -> tuple[dict[str, str], bytes]:
    """A model_version_alias.created delivery as MLflow signs it; ``fields`` replace the data's."""
    payload = {"name": "iris", "alias": "champion", "version": "1", **fields} if data is None else data
    event = {"entity": "model_version_alias", "action": "created", "timestamp": "2026-11-29T07:14:20+00:00",
             "data": {k: v for k, v in payload.items() if v is not None}}
    body = json.dumps(event).encode()
    delivery_id, stamp = delivery_id or str(uuid.uuid4()), str(int(time.time()))
    secret = secret_path(settings).read_bytes().strip()
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": sign(secret, delivery_id, stamp, body)}, body


def watcher(settings: Settings, recorder: Recorder) -> Watch:
    return Watch(settings, deployer=recorder, poll_s=0)


def test_a_delivery_replayed_after_the_watcher_restarts_is_refused(settings: Settings) -> None:
    recorder = Recorder()
    delivery = signed(settings)
    first = watcher(settings, recorder)
    assert first.handle(*delivery)[0] == 202
    assert first.dispatcher.drain(10)
    first.stop()

    restarted = watcher(settings, recorder)  # a new process: only what is on disk is remembered
    status, answer = restarted.handle(*delivery)
    assert (status, "already received" in answer["error"]) == (409, True), answer
    assert restarted.handle(*signed(settings))[0] == 202, "a new delivery is still accepted"
    assert restarted.dispatcher.drain(10)
    assert len(recorder.calls) == 2, [t.key for t in recorder.calls]


@pytest.mark.parametrize("version", [None, "abc", "0", "-1", "1.5", "", 10**12, True, [1]])
def test_an_alias_move_without_a_valid_version_is_refused(settings: Settings, version: object) -> None:
    recorder = Recorder()
    watch = watcher(settings, recorder)
    data = {"name": "iris", "alias": "champion"} | ({} if version is None else {"version": version})
    status, answer = watch.handle(*signed(settings, data))
    assert status == 400 and "version" in answer["error"], (status, answer)
    assert watch.dispatcher.drain(5) and recorder.calls == []


@pytest.mark.parametrize("fields", [
    {"name": "../../etc"}, {"name": ""}, {"name": "ir is"}, {"name": "iris\n"}, {"name": "x" * 300},
    {"alias": "champ ion"}, {"alias": "champion\nforged"}, {"alias": "../serving"}, {"alias": ""},
])
def test_names_and_aliases_that_are_not_plain_names_are_refused_with_400(settings: Settings,
                                                                        fields: dict[str, str]) -> None:
    recorder = Recorder()
    watch = watcher(settings, recorder)
    status, answer = watch.handle(*signed(settings, **fields))
    assert status == 400 and "not a plain name" in answer["error"], (status, answer)
    assert watch.dispatcher.drain(5) and recorder.calls == []


def test_every_value_from_a_request_is_logged_escaped(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    forged = "champion\n2026-11-29 07:14:20,000 ferry.watch iris@champion (v9) [webhook x]: committed"
    watch = watcher(settings, Recorder())
    with caplog.at_level(logging.INFO, logger="ferry.watch"):
        watch.handle(*signed(settings, alias=forged))
        watch.handle(*signed(settings, name="ir\x00is"))
        watch.handle(*signed(settings, alias="challenger\u2028x"))
        event = json.dumps({"entity": "model\nversion", "action": "created\x1b[2J", "data": {}}).encode()
        headers = signed(settings)[0]
        secret = secret_path(settings).read_bytes().strip()
        headers["X-MLflow-Signature"] = sign(secret, headers["X-MLflow-Delivery-Id"],
                                             headers["X-MLflow-Timestamp"], event)
        watch.handle(headers, event)
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("ferry.watch")]
    assert len(messages) >= 4, messages
    for message in messages:
        assert message.isprintable(), repr(message)
    text = "\n".join(messages)
    assert "champion\\n2026-11-29" in text and "ir\\x00is" in text and "\\u2028" in text and "\\x1b[2J" in text


def test_the_replay_window_on_disk_is_bounded_and_survives_a_bad_file(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from ferry.adapters.watch import ReplayGuard

    path = tmp_path / "watch" / "deliveries.json"
    guard = ReplayGuard(path, window_s=600, limit=3)
    for number in range(5):
        assert guard.first_time(f"d{number}", now=1000.0 + number)
    assert sorted(json.loads(path.read_text())) == ["d2", "d3", "d4"], "the oldest go first"
    again = ReplayGuard(path, window_s=600, limit=3)
    assert not again.first_time("d4", now=1010.0) and not again.first_time("d2", now=1010.0)
    assert again.first_time("d2", now=1002.0 + 601), "an id older than the window is forgotten"
    assert [p.name for p in path.parent.iterdir()] == ["deliveries.json"], "no temporary file is left"

    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ferry.watch"):
        fresh = ReplayGuard(path)
    assert "is unreadable" in caplog.text and fresh.first_time("d9", now=5.0)
    assert list(json.loads(path.read_text())) == ["d9"], "the file is whole again after the next delivery"
