"""A trigger deployed as a run of the deploy DAG, through Airflow 3's REST API."""

from __future__ import annotations

import threading
import time
from typing import Any

from ferry.adapters.watch.deployers import REFUSED, MlflowRegistry, refusal
from ferry.adapters.watch.logs import log
from ferry.adapters.watch.triggers import Trigger
from ferry.core.config import Settings
from ferry.core.errors import InvalidInput, Unavailable
from ferry.core.registry import Registry

AIRFLOW_TIMEOUT_S = 10.0
AIRFLOW_FOLLOW_S = 3600.0  # how long a dispatcher follows a DAG run to its end before taking the next trigger


def dag_run_id(trigger: Trigger) -> str:
    """One Airflow run per delivery: a retried delivery gets the same id, and Airflow refuses it (409)."""
    return f"ferry__{trigger.model}__{trigger.alias}"[:170] + f"__{trigger.key}"


class AirflowDeployer:
    """A run of the deploy DAG, started while the alias names the trigger's version (the DAG resolves the alias
    again when it runs), and followed until it ends (or ``follow_s``)."""

    via = "airflow"

    def __init__(self, settings: Settings, follow_s: float = AIRFLOW_FOLLOW_S, poll_s: float = 3.0,
                 stopping: threading.Event | None = None, registry: Registry | None = None) -> None:
        import requests

        self.url = settings.airflow.url.rstrip("/")
        self.dag_id = settings.airflow.dag_id
        self.username, self.password = settings.airflow.username, settings.airflow.password
        self.follow_s, self.poll_s = follow_s, poll_s
        self.stopping = stopping or threading.Event()
        self.registry = MlflowRegistry(settings, registry)
        self.session = requests.Session()
        self.session.trust_env = False
        self._token: str | None = None

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        for attempt in range(3):
            try:
                return self.session.request(method, f"{self.url}{path}", timeout=AIRFLOW_TIMEOUT_S, **kwargs)
            except requests.RequestException as error:
                if attempt == 2 or self.stopping.wait(2**attempt):
                    raise Unavailable(f"Airflow at {self.url} did not answer: {type(error).__name__}: {error}",
                                      "check FERRY_AIRFLOW_URL and that Airflow's API server runs") from None
        raise AssertionError("unreachable")

    def _login(self) -> None:
        if not self.password:
            return
        reply = self._send("POST", "/auth/token", json={"username": self.username, "password": self.password})
        if reply.status_code not in (200, 201):
            raise InvalidInput(f"Airflow refused the login of '{self.username}': HTTP {reply.status_code} "
                               f"{reply.text[:200]}", "check FERRY_AIRFLOW_USERNAME and FERRY_AIRFLOW_PASSWORD")
        try:
            self._token = str(reply.json()["access_token"])
        except (ValueError, KeyError, TypeError):
            raise InvalidInput(f"Airflow's /auth/token at {self.url} answered without an access_token",
                               "check that FERRY_AIRFLOW_URL is Airflow 3's API server") from None

    def _api(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.password and self._token is None:
            self._login()
        for retry in (False, True):
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            reply = self._send(method, path, headers=headers, **kwargs)
            if reply.status_code != 401 or retry or not self.password:
                return reply
            self._login()  # the token expired
        raise AssertionError("unreachable")

    def run(self, trigger: Trigger) -> tuple[str, str]:
        reason = refusal(self.registry.get(), trigger)
        if reason is not None:
            return REFUSED, reason
        run_id = dag_run_id(trigger)
        body = {"dag_run_id": run_id, "logical_date": None, "conf": {"model": trigger.model, "alias": trigger.alias}}
        reply = self._api("POST", f"/api/v2/dags/{self.dag_id}/dagRuns", json=body)
        duplicate = reply.status_code == 409
        if not duplicate and reply.status_code not in (200, 201):
            return "error", f"Airflow refused run {run_id}: HTTP {reply.status_code} {reply.text[:300]}"
        log.info("%s: Airflow run %s %s", trigger.label, run_id,
                 "already exists (a redelivered event): not started again" if duplicate else "started")
        state = self.follow(run_id)
        outcome = "duplicate" if duplicate else f"airflow_{state}"
        return outcome, f"DAG run {run_id}: {state}{self._paused_note(state)}"

    def _paused_note(self, state: str) -> str:
        if state != "queued":
            return ""
        reply = self._api("GET", f"/api/v2/dags/{self.dag_id}")
        paused = reply.status_code == 200 and reply.json().get("is_paused")
        return f" (the DAG is paused: `airflow dags unpause {self.dag_id}`)" if paused else ""

    def follow(self, run_id: str) -> str:
        """The run's state once it ends, or its state when ``follow_s`` has passed."""
        deadline, state = time.monotonic() + self.follow_s, "unknown"
        while True:
            reply = self._api("GET", f"/api/v2/dags/{self.dag_id}/dagRuns/{run_id}")
            if reply.status_code == 200:
                state = str(reply.json().get("state") or "unknown")
            if state in ("success", "failed") or time.monotonic() >= deadline or self.stopping.wait(self.poll_s):
                return state
