"""The gateway's calls to Triton, balanced over the replicas of FERRY_TRITON_URL.

Each call goes to the admitted replica with the fewest calls in flight (ties in turn, so that one request
at a time still visits every replica). A call that cannot reach its replica (refused, reset, unreachable, or
no connection within :data:`CONNECT_TIMEOUT_S`) before any answer came takes that replica out and is sent
once more, to another replica: every call the gateway forwards (inference, readiness, metadata) is
idempotent. A call that reached its replica and timed out waiting for the answer is not sent again (it may
still be running there).

Every :data:`PROBE_INTERVAL_S`, every replica is probed, with a short timeout: with a router, each committed
model's active version must answer ready (a restarted Triton serves nothing until ``ferry reconcile`` loads
it); without one, or with nothing committed, the server must answer ready. A replica that fails (not
ready, unreachable, or, :data:`PROBE_MISSES` times in a row, no answer in time: a busy host can be slow) is
taken out; one that passes is admitted (again). When no replica is admitted, calls go to all of them, as they
would without a balancer (those that answered their last probe first): a probe can be wrong (a committed
version no replica serves takes them all out), a connection attempt decides.

During a rolling deploy, a replica some model's rollout.json lists as ``draining`` gets no new call, for any
model (:meth:`.routing.Router.draining`; its calls in flight finish); a rolling model's probe asks for its front
(a swapped replica lacks the committed store); ``ferry_gateway_in_flight`` is what the deploy waits on.

``dns+http://name:port`` entries are resolved again every :data:`REFRESH_S` (off the event loop), so the
replicas follow a headless Service's ready pods: a new address is admitted once its probe passes, a vanished
one is dropped once its calls have finished. A failed lookup keeps the replicas known so far.

:class:`HttpBalancer` has :class:`.upstream.UpstreamPool`'s ``request`` and ``close``; the gRPC counterpart
is :mod:`.grpc_balancer`. Metrics (``ferry_gateway_replica_*``, by replica and protocol): :class:`ReplicaMetrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry

from ferry.adapters.gateway.replica_metrics import ReplicaMetrics
from ferry.adapters.gateway.upstream import Reply, UpstreamConnection, UpstreamPool
from ferry.adapters.inference.routing import Router
from ferry.core.addresses import Endpoint, ReplicaSource
from ferry.core.config import Settings
from ferry.core.errors import FerryError
from ferry.core.fleet import resolve_replicas
from ferry.core.front import store_name
from ferry.core.status import list_models

PROBE_INTERVAL_S = 1.0  # every replica's readiness, this often
PROBE_TIMEOUT_S = 1.0  # a probe not answered within this fails
PROBE_MISSES = 2  # probes in a row not answered in time that take an admitted replica out (a busy host is slow)
CONNECT_TIMEOUT_S = 2.0  # a connection not made within this is a connection failure (sent elsewhere)
REFRESH_S = 30.0  # dns+ entries are resolved again this often
RESOLVE_TIMEOUT_S = 10.0

log = logging.getLogger("ferry.gateway")
LAST_REPLICA = contextvars.ContextVar("last_replica", default="")  # this task's last call's: Router.answered_on
C = TypeVar("C")  # what a replica is called through: an UpstreamPool, a gRPC channel
T = TypeVar("T")
Resolve = Callable[[Iterable[ReplicaSource]], list[Endpoint]]


class ConnectFailed(ConnectionError):
    """No connection to a replica could be made: refused, unreachable, or not within the connect timeout."""


@dataclass(eq=False)
class Replica(Generic[C]):
    """One replica as a balancer sees it: how to call it, whether it is admitted, its calls in flight."""

    name: str  # its HTTP URL, as FERRY_TRITON_URL and ferry's other metrics name it
    endpoint: Endpoint  # where this protocol reaches it
    client: C
    sent: Any  # its requests counter
    up: bool = True
    in_flight: int = 0
    gone: bool = False  # dropped by a DNS refresh: closed once its last call has finished
    missed: int = 0  # probes in a row not answered in time
    reachable: bool = True  # its last call or probe got an answer (if only "not ready")


def probe_targets(router: Router) -> list[tuple[str, str]]:
    """The Triton model and version (empty: the front's one) each committed model's probe asks for: the active
    version's store, or, during the model's rolling deploy, its front."""
    found = []
    for model, version in committed_versions(router):
        found.append((model, "") if _rolling(router, model) else (store_name(model, version), str(version)))
    return found


def _rolling(router: Router, model: str) -> bool:
    if not isinstance(router, Router):  # a stand-in (tests): no rollout.json to follow
        return False
    try:
        return router.follow(router.route(model))[0].front
    except (FerryError, OSError, ValueError):
        return False


def committed_versions(router: Router) -> list[tuple[str, int]]:
    """Each committed model and its active version, as the gateway routes them now."""
    found = []
    for model in list_models(router.repository):
        try:
            found.append((model, router.route(model).version))
        except (FerryError, OSError, ValueError):  # nothing committed, or unreadable: nothing to probe for it
            continue
    return found


class Balancer(Generic[C]):
    """Replicas, their admission and the choice of one per call; a protocol supplies the client and the probe."""

    protocol = ""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None, router: Router | None = None,
                 *, probe_interval_s: float = PROBE_INTERVAL_S, probe_timeout_s: float = PROBE_TIMEOUT_S,
                 refresh_s: float = REFRESH_S, resolve: Resolve = resolve_replicas) -> None:
        self.settings, self.router = settings, router
        self.timeout_s = settings.triton.timeout_s
        self.probe_interval_s, self.probe_timeout_s, self.refresh_s = probe_interval_s, probe_timeout_s, refresh_s
        self.metrics = ReplicaMetrics.of(registry)
        self._resolve = resolve
        self._sources = settings.triton.sources
        self._retried = self.metrics.retried.labels(self.protocol)
        self.replicas: list[Replica[C]] = []
        self.leaving: set[Replica[C]] = set()  # dropped by a DNS refresh, their calls not all answered yet
        self._turn = 0
        self._task: asyncio.Task | None = None
        self._closed = False
        self.metrics.balancers.add(self)

    # -------------------------------------------------------------- what a protocol supplies

    def _open(self, endpoint: Endpoint) -> C:
        raise NotImplementedError

    def _close_client(self, client: C) -> None:
        raise NotImplementedError

    def _endpoint(self, replica: Endpoint) -> Endpoint:
        """Where this protocol reaches a replica whose HTTP address is ``replica``."""
        return replica

    async def _ready(self, replica: Replica[C], committed: Sequence[tuple[str, str]]) -> bool:
        """Whether every (model, version) of ``committed`` (version empty: the front) is ready on ``replica``."""
        raise NotImplementedError

    def _unreachable(self, error: BaseException) -> bool:
        """Whether ``error`` means the call never reached its replica or lost it before any answer."""
        raise NotImplementedError

    def _describe(self, error: BaseException) -> str:
        return f"{type(error).__name__}: {error}"

    # -------------------------------------------------------------- calls

    async def call(self, send: Callable[[Replica[C]], Awaitable[T]]) -> T:
        """``send`` to the least busy admitted replica; once more to another if that one could not be reached."""
        if self._task is None:
            self.start()
        first = self.pick()
        if first is None:
            if self.replicas:
                raise ConnectFailed("every Triton replica is draining for a rolling deploy (rollout.json's "
                                    "'draining'): none takes a new call")
            raise ConnectFailed(f"no Triton replica is known (FERRY_TRITON_URL={self.settings.triton.urls})")
        try:
            return await self._send(first, send)
        except Exception as error:  # re-raised unless the replica was unreachable
            second = self.pick((first,)) if self._unreachable(error) else None
            if second is None:
                raise
            log.warning("%s call to %s failed (%s); sent once more to %s", self.protocol, first.name,
                        self._describe(error), second.name)
        self._retried.inc()
        return await self._send(second, send)

    async def _send(self, replica: Replica[C], send: Callable[[Replica[C]], Awaitable[T]]) -> T:
        LAST_REPLICA.set(replica.name)
        replica.in_flight += 1
        replica.sent.inc()
        try:
            return await send(replica)
        except Exception as error:  # re-raised; an unreachable replica is ejected first
            if self._unreachable(error):
                replica.reachable = False
                self._eject(replica, "connect", self._describe(error))
            raise
        finally:
            replica.in_flight -= 1
            if replica.gone and not replica.in_flight:
                self.leaving.discard(replica)
                self._close_client(replica.client)

    def pick(self, exclude: Sequence[Replica[C]] = ()) -> Replica[C] | None:
        """The admitted replica with the fewest calls in flight (ties in turn); any replica if none is admitted.
        Never one a rolling deploy drains (None if every replica is draining)."""
        replicas = self.replicas
        count = len(replicas)
        if not count:
            return None
        draining = self.router.draining() if isinstance(self.router, Router) else ()
        if draining:
            exclude = [*exclude, *(r for r in replicas if r.name in draining)]
        self._turn = turn = (self._turn + 1) % count
        best = None
        for i in range(count):
            replica = replicas[(turn + i) % count]
            if replica.up and (best is None or replica.in_flight < best.in_flight) and replica not in exclude:
                best = replica
        if best is None:  # none admitted: as without a balancer, but those that answer at all first
            others = [r for r in replicas if r not in exclude]
            others = [r for r in others if r.reachable] or others
            best = min(others, key=lambda r: r.in_flight) if others else None
        return best

    # -------------------------------------------------------------- admission

    def _eject(self, replica: Replica[C], reason: str, why: str) -> None:
        if replica.up and not replica.gone:
            replica.up = False
            self.metrics.up.labels(replica.name, self.protocol).set(0)
            self.metrics.ejections.labels(replica.name, self.protocol, reason).inc()
            log.warning("Triton replica %s taken out of %s balancing (%s): %s", replica.name, self.protocol,
                        reason, why)

    def _admit(self, replica: Replica[C]) -> None:
        if not replica.up and not replica.gone:
            replica.up = True
            self.metrics.up.labels(replica.name, self.protocol).set(1)
            log.warning("Triton replica %s admitted to %s balancing", replica.name, self.protocol)

    async def probe(self) -> None:
        """Probe every replica once (concurrently): admit those that pass; take out those that fail, or that
        did not answer in time :data:`PROBE_MISSES` times in a row."""
        committed = probe_targets(self.router) if self.router is not None else []
        replicas = list(self.replicas)
        results = await asyncio.gather(*(self._probe(replica, committed) for replica in replicas))
        for replica, (failure, missed, reachable) in zip(replicas, results):
            replica.missed, replica.reachable = (replica.missed + 1 if missed else 0), reachable
            if not failure:
                self._admit(replica)
            elif not missed or replica.missed >= PROBE_MISSES:
                self._eject(replica, "probe", failure)

    async def _probe(self, replica: Replica[C], committed: Sequence[tuple[str, str]]) -> tuple[str, bool, bool]:
        """Why ``replica`` failed its probe (empty if it passed), whether it only did not answer in time, and
        whether it answered."""
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                return ("" if await self._ready(replica, committed) else "not ready"), False, True
        except TimeoutError:
            return f"no answer within {self.probe_timeout_s:g} s", True, False
        except Exception as error:  # a probe that fails in any way takes the replica out
            return self._describe(error), False, False

    # -------------------------------------------------------------- membership

    def resolve_now(self) -> None:
        """Resolve the replicas (blocking: at start; later refreshes run off the event loop)."""
        try:
            self._update(self._resolve(self._sources), admitted=True)
        except (FerryError, OSError) as error:  # probed again, and resolved, by the background task
            log.warning("Triton replicas not resolved yet: %s", error)

    async def refresh(self) -> None:
        """Resolve the replicas again; a new one waits for its probe, a vanished one is dropped."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                endpoints = await loop.run_in_executor(None, self._resolve, self._sources)
        except (FerryError, OSError) as error:  # TimeoutError included: keep what is known
            log.warning("Triton replicas not resolved again (keeping %d): %s", len(self.replicas), error)
            return
        self._update(endpoints, admitted=not self.replicas)

    def _update(self, endpoints: list[Endpoint], admitted: bool) -> None:
        known = {replica.name: replica for replica in self.replicas}
        fresh = [known.get(e.url) or self._replica(e, admitted) for e in endpoints]
        for replica in set(self.replicas) - set(fresh):
            replica.gone = True
            with contextlib.suppress(KeyError):
                self.metrics.up.remove(replica.name, self.protocol)
            if not replica.in_flight:
                self._close_client(replica.client)
            else:
                self.leaving.add(replica)
        self.replicas = fresh

    def _replica(self, endpoint: Endpoint, admitted: bool) -> Replica[C]:
        name = endpoint.url
        self.metrics.up.labels(name, self.protocol).set(1 if admitted else 0)
        at = self._endpoint(endpoint)
        return Replica(name, at, self._open(at), self.metrics.requests.labels(name, self.protocol), up=admitted)

    # -------------------------------------------------------------- the background task

    def start(self) -> None:
        """Start probing (and resolving again) in the running loop; done by the first call if not before."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        dns = any(source.dns for source in self._sources)
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                if not self.replicas or (dns and loop.time() - refreshed >= self.refresh_s):
                    await self.refresh()
                    refreshed = loop.time()
                await self.probe()
            except Exception:  # a bug must not stop the probing: log it, try again next round
                log.exception("probing the Triton replicas failed")

    def _stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None


class _ReplicaPool(UpstreamPool):
    """An :class:`.upstream.UpstreamPool` whose connection attempts have their own, short timeout, and fail as
    :class:`ConnectFailed`: a call that could not connect is sent to another replica."""

    def __init__(self, host: str, port: int, timeout_s: float, connect_timeout_s: float) -> None:
        super().__init__(host, port, timeout_s)
        self.connect_timeout_s = connect_timeout_s

    async def connect(self) -> UpstreamConnection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                return await super().connect()
        except OSError as error:  # TimeoutError is one
            reason = f"no connection within {self.connect_timeout_s:g} s" if isinstance(error, TimeoutError) \
                else f"{type(error).__name__}: {error}"
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {reason}") from None


@dataclass(eq=False)
class _HttpClient:
    pool: _ReplicaPool  # the calls
    probes: UpstreamPool  # the probes, on their own connection and with their own timeout


class HttpBalancer(Balancer[_HttpClient]):
    """:class:`.upstream.UpstreamPool`'s ``request`` and ``close``, balanced over the replicas."""

    protocol = "http"

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None, router: Router | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, **tuning: Any) -> None:
        super().__init__(settings, registry, router, **tuning)
        self.connect_timeout_s = min(connect_timeout_s, self.timeout_s)
        self.resolve_now()

    def _open(self, endpoint: Endpoint) -> _HttpClient:
        return _HttpClient(_ReplicaPool(endpoint.host, endpoint.port, self.timeout_s, self.connect_timeout_s),
                           UpstreamPool(endpoint.host, endpoint.port, self.probe_timeout_s))

    def _close_client(self, client: _HttpClient) -> None:
        client.pool.close()
        client.probes.close()

    def _unreachable(self, error: BaseException) -> bool:
        # A connection refused, reset or closed before the answer; not a timeout waiting for the answer.
        return isinstance(error, OSError) and not isinstance(error, TimeoutError)

    async def _ready(self, replica: Replica[_HttpClient], committed: Sequence[tuple[str, str]]) -> bool:
        paths = [f"/v2/models/{name}/versions/{version}/ready" if version else f"/v2/models/{name}/ready"
                 for name, version in committed]
        for path in paths or ["/v2/health/ready"]:
            if (await replica.client.probes.request("GET", path)).status != 200:
                return False
        return True

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Sequence[tuple[bytes, bytes]] = ()) -> Reply:
        """Send one request to a replica and read its answer; raises OSError or TimeoutError if none answers."""
        async def send(replica: Replica[_HttpClient]) -> Reply:
            return await replica.client.pool.request(method, path, body, headers)

        return await self.call(send)

    def close(self) -> None:
        self._stop()
        for replica in self.replicas:
            self._close_client(replica.client)

