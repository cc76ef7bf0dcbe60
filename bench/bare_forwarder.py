"""A bare forwarder, the floor of a Python hop on this machine: bench/perf.py measures it beside the gateway.

HTTP: the gateway's own HTTP server (``ferry.adapters.gateway.http_server``) and its upstream pool to Triton,
each request passed on as it came and Triton's answer passed back: no token, guard, routing, rewriting or
metrics. gRPC: a grpc.aio server with one generic handler passing each call's bytes to Triton's channel, as
the gateway's handlers do, with nothing else. Both in one uvloop event loop, as the gateway runs them.

    python bench/bare_forwarder.py --triton 127.0.0.1:8000 --triton-grpc 127.0.0.1:8001 --port 9000 --grpc-port 9001
    (/healthz answers 200 once both listen)
"""

from __future__ import annotations

import argparse

import grpc
import uvloop

from ferry.adapters.gateway.http_server import HttpServer
from ferry.adapters.gateway.http_wire import Answer, Limits, Request
from ferry.adapters.gateway.upstream import UpstreamPool

PASSED = (b"content-type", b"inference-header-content-length")
MAX_BYTES = 64 * 1024 * 1024


def http_forwarder(triton: str) -> HttpServer:
    host, port = triton.rsplit(":", 1)
    pool = UpstreamPool(host, int(port), timeout_s=30)

    async def respond(request: Request) -> Answer:
        if request.path == "/healthz":
            return Answer(200)
        headers = [(name, value) for name, value in request.headers if name in PASSED]
        reply = await pool.request(request.method, request.path, request.body, headers)
        return Answer(reply.status, [(name, reply.headers[name]) for name in PASSED if name in reply.headers],
                      reply.body)

    return HttpServer(respond, Limits(MAX_BYTES, 30))


class GrpcForwarder(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel, self.calls = channel, {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method not in self.calls:
            self.calls[method] = self.channel.unary_unary(method)
        call = self.calls[method]

        async def forward(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await call(raw, timeout=30)

        return grpc.unary_unary_rpc_method_handler(forward)


async def main(args: argparse.Namespace) -> None:
    options = [("grpc.max_receive_message_length", MAX_BYTES), ("grpc.max_send_message_length", MAX_BYTES)]
    channel = grpc.aio.insecure_channel(args.triton_grpc, options=options)
    grpc_server = grpc.aio.server(options=options)
    grpc_server.add_generic_rpc_handlers((GrpcForwarder(channel),))
    grpc_server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    await grpc_server.start()

    async def stopped() -> None:
        await grpc_server.stop(1)
        await channel.close()

    async def started() -> None:
        return None

    await http_forwarder(args.triton).serve("127.0.0.1", args.port, started, stopped)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", required=True, help="Triton's HTTP host:port")
    parser.add_argument("--triton-grpc", required=True, help="Triton's gRPC host:port")
    parser.add_argument("--port", type=int, required=True, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, required=True)
    uvloop.run(main(parser.parse_args()))
