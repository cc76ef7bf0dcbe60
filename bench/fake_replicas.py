"""A stand-in for many Triton replicas, for bench/fleet.py: N fake servers on loopback, one process.

Sixty-four real Triton servers (45 MB each, plus 70 MB per loaded version) do not fit a benchmark on
a 2-core machine; these answer the calls a deploy makes (repository index, load, unload, readiness,
inference) the way Triton does, with a configurable load delay. Inference answers the golden outputs
recorded in the version's smoke.json (read from the shared repository), so smoke passes.

    python bench/fake_replicas.py REPOSITORY BASE_PORT COUNT LOAD_DELAY_S

Prints "ready" once every server listens; on SIGTERM, the most requests that were in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from aiohttp import web


class Replica:
    def __init__(self, repository: Path, load_delay_s: float) -> None:
        self.repository = repository
        self.load_delay_s = load_delay_s
        self.models: dict[str, list[int]] = {}

    async def index(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": m, "version": str(v), "state": "READY"}
                                  for m, versions in self.models.items() for v in versions])

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        config = json.loads(body["parameters"]["config"])
        await asyncio.sleep(self.load_delay_s)
        self.models[request.match_info["model"]] = [int(v) for v in config["version_policy"]["specific"]["versions"]]
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        self.models.pop(request.match_info["model"], None)
        return web.json_response({})

    async def ready(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], int(request.match_info["version"])
        return web.Response(status=200 if version in self.models.get(model, []) else 400)

    async def infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info["version"]
        await request.read()
        sample = json.loads((self.repository / model / version / "smoke.json").read_text())
        outputs = [{"name": name, **tensor} for name, tensor in sample["outputs"].items()]
        return web.json_response({"model_name": model, "model_version": version, "outputs": outputs})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)


def app(replica: Replica, in_flight: InFlight) -> web.Application:
    application = web.Application(middlewares=[in_flight.count])
    application.add_routes([
        web.post("/v2/repository/index", replica.index),
        web.post("/v2/repository/models/{model}/load", replica.load),
        web.post("/v2/repository/models/{model}/unload", replica.unload),
        web.get("/v2/models/{model}/versions/{version}/ready", replica.ready),
        web.post("/v2/models/{model}/versions/{version}/infer", replica.infer),
        web.get("/v2/health/live", replica.live),
        web.get("/v2/health/ready", replica.live),
    ])
    return application


class InFlight:
    """Requests being answered at once, across every server (each holds one connection while it runs)."""

    def __init__(self) -> None:
        self.now = self.most = 0

    @web.middleware
    async def count(self, request: web.Request, handler):
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await handler(request)
        finally:
            self.now -= 1


async def main(repository: Path, base_port: int, count: int, load_delay_s: float) -> None:
    in_flight = InFlight()
    runners = []
    for i in range(count):
        runner = web.AppRunner(app(Replica(repository, load_delay_s), in_flight), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", base_port + i).start()
        runners.append(runner)
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(f"most requests in flight at once: {in_flight.most}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
