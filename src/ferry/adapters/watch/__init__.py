"""``ferry watch``: an alias moved in the MLflow Model Registry starts a deploy of the version it names.

An adapter (uvicorn and FastAPI, as the gateway) in these parts:

- **The receiver** (``app``, ``service``, ``delivery``, ``connections``), ``POST /mlflow/webhook``: MLflow 3
  registry webhooks, signed with HMAC-SHA256 (``X-MLflow-Signature: v1,<base64(HMAC(secret, "<delivery
  id>.<timestamp>.<body>"))>``). A delivery is refused with 401 when unsigned or wrongly signed, or when its
  timestamp is more than 5 minutes away; with 409 when its delivery id was already received (the ids of
  the window are kept in ``$FERRY_HOME/watch/deliveries.json``, so a restart forgets none); 400 when
  malformed, when its version is missing or not a number, or when its name or alias is not a plain name;
  413 over 64 KiB; 408 when its headers or its body do not arrive within 10 s each. A verified
  ``model_version_alias.created`` for a watched alias is accepted (202); every other verified event or
  alias is acknowledged and ignored (200, with the reason). The serving alias, which ferry moves itself,
  is never acted on. Every value from a request is logged escaped (``logs``).
- **The poller** (``poller``, ``--poll 30s``), for where webhooks cannot reach.
- **The dispatcher** (``dispatcher``, ``deployers``, ``airflow``): a deploy per trigger, one at a time per
  model, queued (a newer move of a waiting model and alias takes the waiting one's place). Each deploys
  exactly the version its alias moved to, and only while the alias still names it; else it is refused
  with the reason, as is a model MLflow does not know. The deploy is an Airflow DAG run through Airflow's
  REST API when FERRY_AIRFLOW_URL is set, its ``dag_run_id`` derived from the delivery so that a
  redelivered event cannot start a second run; else ferry's own deploy in this process. Each trigger and
  its outcome are logged, counted on ``/metrics``, listed on ``/triggers`` and written to
  ``$FERRY_HOME/watch/triggers.jsonl``.
- **Registration** (``registration``): ``ferry watch register`` creates the webhook in MLflow.
"""

from ferry.adapters.watch.airflow import AirflowDeployer, dag_run_id
from ferry.adapters.watch.app import build_app, serve
from ferry.adapters.watch.delivery import ALIAS_CREATED, WEBHOOK_PATH, AliasMove, ReplayGuard, sign, verify
from ferry.adapters.watch.deployers import LocalDeployer
from ferry.adapters.watch.dispatcher import Dispatcher
from ferry.adapters.watch.files import read_or_create_secret, secret_path, watched_aliases
from ferry.adapters.watch.poller import Poller, Seen
from ferry.adapters.watch.registration import Registration, register_webhook
from ferry.adapters.watch.service import Watch
from ferry.adapters.watch.triggers import Deployer, Trigger, TriggerLog

__all__ = [
    "ALIAS_CREATED", "WEBHOOK_PATH", "AirflowDeployer", "AliasMove", "Deployer", "Dispatcher", "LocalDeployer",
    "Poller", "Registration", "ReplayGuard", "Seen", "Trigger", "TriggerLog", "Watch", "build_app",
    "dag_run_id", "read_or_create_secret", "register_webhook", "secret_path", "serve", "sign", "verify",
    "watched_aliases",
]
