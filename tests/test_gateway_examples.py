"""Triton's own clients against the gateway and against Triton: the same results and the same errors.

Triton's example models `simple` (INPUT0, INPUT1 INT32 [1, 16] -> OUTPUT0 the sum, OUTPUT1 the difference) and
`simple_int8` (the same on INT8) are built here as ONNX and deployed by ferry. The calls NVIDIA's example clients
make (triton-inference-server/client, src/python/examples: inference, health, metadata, statistics; wrong model
names and version strings) are made with tritonclient.http and tritonclient.grpc, to the gateway and to Triton
directly, and must agree. With FERRY_TRITON_CLIENT_EXAMPLES pointing at a copy of those examples, the examples
themselves run too, unchanged, against both.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from conftest import World
from ferry.core.runner import deploy
from ferry.publish import log_onnx_model, register_version
from support.gateway import Running, running_gateway

EXAMPLES = os.environ.get("FERRY_TRITON_CLIENT_EXAMPLES", "")
# The examples that use only inference, health, metadata and statistics on `simple` and `simple_int8`.
EXAMPLE_CLIENTS = [
    ("simple_http_health_metadata.py", "http"), ("simple_http_infer_client.py", "http"),
    ("simple_http_async_infer_client.py", "http"), ("simple_http_aio_infer_client.py", "http"),
    ("simple_grpc_health_metadata.py", "grpc"), ("simple_grpc_infer_client.py", "grpc"),
    ("simple_grpc_async_infer_client.py", "grpc"), ("simple_grpc_aio_infer_client.py", "grpc"),
    ("simple_grpc_custom_args_client.py", "grpc"), ("simple_grpc_keepalive_client.py", "grpc"),
    ("grpc_explicit_int_content_client.py", "grpc"), ("grpc_explicit_int8_content_client.py", "grpc"),
]
INPUT0 = np.arange(16, dtype=np.int32).reshape(1, 16)
INPUT1 = np.full((1, 16), -1, dtype=np.int32)


def simple_onnx(datatype: int) -> bytes:
    """Triton's `simple` (INT32: Add and Sub) or `simple_int8` (through INT32 and back) as an ONNX model."""
    inputs = [helper.make_tensor_value_info(name, datatype, [1, 16]) for name in ("INPUT0", "INPUT1")]
    outputs = [helper.make_tensor_value_info(name, datatype, [1, 16]) for name in ("OUTPUT0", "OUTPUT1")]
    if datatype == TensorProto.INT32:
        nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
                 helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    else:
        nodes = [helper.make_node("Cast", ["INPUT0"], ["A"], to=TensorProto.INT32),
                 helper.make_node("Cast", ["INPUT1"], ["B"], to=TensorProto.INT32),
                 helper.make_node("Add", ["A", "B"], ["SUM"]), helper.make_node("Sub", ["A", "B"], ["DIFFERENCE"]),
                 helper.make_node("Cast", ["SUM"], ["OUTPUT0"], to=datatype),
                 helper.make_node("Cast", ["DIFFERENCE"], ["OUTPUT1"], to=datatype)]
    graph = helper.make_graph(nodes, "simple", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def deploy_simple(world: World, name: str, dtype: type, datatype: int) -> None:
    mlflow.set_tracking_uri(world.settings.tracking_uri)
    mlflow.set_experiment("triton-examples")
    sample = {"INPUT0": np.arange(16, dtype=dtype).reshape(1, 16), "INPUT1": np.ones((1, 16), dtype=dtype)}
    with mlflow.start_run() as run:
        source = log_onnx_model(simple_onnx(datatype), sample)
    register_version(name, source, run.info.run_id, "champion", tracking_uri=world.settings.tracking_uri)
    assert deploy(world.ferry, name, alias="champion").outcome == "committed"


@pytest.fixture
def simple(world: World) -> Iterator[tuple[World, Running]]:
    deploy_simple(world, "simple", np.int32, TensorProto.INT32)
    deploy_simple(world, "simple_int8", np.int8, TensorProto.INT8)
    with running_gateway(world, token="") as gateway:  # the examples send no token
        yield world, gateway


def addresses(world: World, gateway: Running) -> dict[str, tuple[str, str]]:
    """HTTP and gRPC addresses (host:port) of the gateway and of Triton itself."""
    triton = world.settings.triton.urls.removeprefix("http://")
    host, port = triton.rsplit(":", 1)
    return {"gateway": (gateway.host_port, gateway.grpc), "triton": (triton, f"{host}:{int(port) + 1}")}


def outcome(call: Callable[[], object]) -> object:
    """What a call gave: its value, or ("error", status, message) for a refusal."""
    try:
        return call()
    except InferenceServerException as error:
        return ("error", str(error.status()), error.message())


def http_session(url: str) -> dict[str, object]:
    """What NVIDIA's HTTP examples check, as they check it."""
    client = httpclient.InferenceServerClient(url, network_timeout=30)
    try:
        def infer(model: str, version: str = "", binary: bool = True, compression: str | None = None) -> object:
            inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16],
                                                                                                "INT32")]
            inputs[0].set_data_from_numpy(INPUT0, binary_data=False)
            inputs[1].set_data_from_numpy(INPUT1, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
                       httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
            answer = client.infer(model, inputs, model_version=version, outputs=outputs,
                                  query_params={"test_1": 1, "test_2": 2}, request_compression_algorithm=compression,
                                  response_compression_algorithm=compression)
            return answer.as_numpy("OUTPUT0").tolist(), answer.as_numpy("OUTPUT1").tolist()

        def stats(model: str, version: str = "") -> object:
            found = client.get_inference_statistics(model, version)["model_stats"]
            return [(s["name"], s["version"], s["inference_count"] > 0) for s in found]

        return {
            "live": client.is_server_live(query_params={"test_1": 1}), "ready": client.is_server_ready(),
            "model ready": client.is_model_ready("simple"), "v2 ready": client.is_model_ready("simple", "2"),
            "server": client.get_server_metadata()["name"],
            "metadata": outcome(lambda: {k: v for k, v in client.get_model_metadata("simple").items()
                                         if k in ("name", "versions", "inputs", "outputs")}),
            "wrong name": outcome(lambda: client.get_model_metadata("wrong_model_name")),
            "config": outcome(lambda: client.get_model_config("simple", "1")["input"][0]["dims"]),
            "infer json": outcome(lambda: infer("simple", binary=False)),
            "infer binary": outcome(lambda: infer("simple", "1")),
            "infer gzip": outcome(lambda: infer("simple", compression="gzip")),
            "infer deflate": outcome(lambda: infer("simple", compression="deflate")),
            "infer wrong name": outcome(lambda: infer("wrong_model_name")),
            "infer v2": outcome(lambda: infer("simple", "2")),
            "infer v99999999999999999999": outcome(lambda: infer("simple", "99999999999999999999")),
            "stats": outcome(lambda: stats("simple")), "stats v1": outcome(lambda: stats("simple", "1")),
            "stats v2": outcome(lambda: stats("simple", "2")),
            "stats wrong name": outcome(lambda: stats("wrong_model_name")),
        }
    finally:
        client.close()


def grpc_session(url: str) -> dict[str, object]:
    """What NVIDIA's gRPC examples check, as they check it (tritonclient.grpc, and raw stubs for int8)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        def infer(model: str, version: str = "") -> object:
            inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16],
                                                                                                "INT32")]
            inputs[0].set_data_from_numpy(INPUT0)
            inputs[1].set_data_from_numpy(INPUT1)
            answer = client.infer(model, inputs, model_version=version, client_timeout=30)
            return answer.as_numpy("OUTPUT0").tolist(), answer.as_numpy("OUTPUT1").tolist()

        def stats(model: str, version: str = "") -> object:
            found = client.get_inference_statistics(model, version, as_json=True)["model_stats"]
            return [(s["name"], s["version"], int(s["inference_count"]) > 0) for s in found]

        return {
            "live": client.is_server_live(headers={"test": "1"}), "ready": client.is_server_ready(),
            "model ready": client.is_model_ready("simple"), "v2 ready": client.is_model_ready("simple", "2"),
            "wrong name ready": client.is_model_ready("wrong_model_name"),
            "server": client.get_server_metadata().name,
            "metadata": outcome(lambda: {k: v for k, v in client.get_model_metadata("simple", as_json=True).items()
                                         if k in ("name", "versions", "inputs", "outputs")}),
            "wrong name": outcome(lambda: client.get_model_metadata("wrong_model_name")),
            "config": outcome(lambda: list(client.get_model_config("simple").config.input[0].dims)),
            "infer": outcome(lambda: infer("simple")), "infer v1": outcome(lambda: infer("simple", "1")),
            "infer v1x": outcome(lambda: infer("simple", "1x")),
            "infer wrong name": outcome(lambda: infer("wrong_model_name")),
            "infer v2": outcome(lambda: infer("simple", "2")),
            "infer wrong_specification": outcome(lambda: infer("simple", "wrong_specification")),
            "infer v-1": outcome(lambda: infer("simple", "-1")),
            "stats": outcome(lambda: stats("simple")), "stats v1": outcome(lambda: stats("simple", "1")),
            "stats v2": outcome(lambda: stats("simple", "2")),
            "stats wrong name": outcome(lambda: stats("wrong_model_name")),
            "stats x": outcome(lambda: stats("simple", "x")),
            "int8": int8_contents(url),
        }
    finally:
        client.close()


def int8_contents(url: str) -> object:
    """grpc_explicit_int8_content_client.py's calls: typed int_contents, raw INT8 outputs (by name: the example
    reads them by position), a wrong version string."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="simple_int8")
        for name, values in (("INPUT0", range(16)), ("INPUT1", [1] * 16)):
            request.inputs.add(name=name, datatype="INT8", shape=[1, 16]).contents.int_contents[:] = values
        request.outputs.add(name="OUTPUT0")
        request.outputs.add(name="OUTPUT1")
        response = stub.ModelInfer(request, timeout=30)
        results = {output.name: np.frombuffer(raw, dtype=np.int8).tolist()
                   for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)}
        request.model_version = "wrong_specification"
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            return results, str(error.code()), error.details()
        return results, "OK", ""


def same(through_gateway: object, direct: object) -> bool:
    """Equal, except that the gateway's error messages add ferry's hint after Triton's words."""
    if isinstance(through_gateway, tuple) and isinstance(direct, tuple) and through_gateway[:1] == ("error",):
        return through_gateway[:2] == direct[:2] and str(through_gateway[2]).startswith(str(direct[2]))
    if isinstance(through_gateway, tuple) and isinstance(direct, tuple) and len(direct) == 3 and \
            isinstance(direct[2], str):  # the int8 session: results, code, details
        return through_gateway[:2] == direct[:2] and through_gateway[2].startswith(direct[2])
    return through_gateway == direct


def test_triton_clients_get_the_same_answers_from_the_gateway_and_from_triton(simple: tuple[World, Running]) -> None:
    world, gateway = simple
    where = addresses(world, gateway)
    http = {name: http_session(urls[0]) for name, urls in where.items()}
    grpc_ = {name: grpc_session(urls[1]) for name, urls in where.items()}
    for protocol, sessions in (("http", http), ("grpc", grpc_)):
        differ = {key: (sessions["gateway"][key], sessions["triton"][key]) for key in sessions["triton"]
                  if not same(sessions["gateway"][key], sessions["triton"][key])}
        assert not differ, f"{protocol}: the gateway and Triton disagree on {differ}"
    sums = ([(INPUT0 + INPUT1).tolist()[0]], [(INPUT0 - INPUT1).tolist()[0]])
    assert http["gateway"]["infer json"] == sums and grpc_["gateway"]["infer"] == sums
    assert grpc_["gateway"]["int8"][0] == {"OUTPUT0": [i + 1 for i in range(16)], "OUTPUT1": [i - 1 for i in range(16)]}
    assert http["gateway"]["stats"] == grpc_["gateway"]["stats v1"] == [("simple", "1", True)]
    unknown = http["gateway"]["wrong name"]
    assert unknown[:2] == ("error", "404") and unknown[2].startswith("Request for unknown model: 'wrong_model_name' "
                                                                     "is not found (")
    assert grpc_["gateway"]["infer wrong_specification"][:2] == ("error", "StatusCode.INVALID_ARGUMENT")
    assert "failed to get model version from specified version string 'wrong_specification'" in \
        grpc_["gateway"]["int8"][2]


def test_statistics_are_the_committed_versions_and_versions_are_worded_as_triton_words_them(
        simple: tuple[World, Running]) -> None:
    gateway = simple[1]
    with httpx.Client(base_url=gateway.url, timeout=30) as session:
        every = session.get("/v2/models/stats")
        assert every.status_code == 200, every.text
        assert sorted((s["name"], s["version"]) for s in every.json()["model_stats"]) == [("simple", "1"),
                                                                                          ("simple_int8", "1")]
        assert "statistics" in session.get("/v2").json()["extensions"]
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
                                      {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [2] * 16}]})
        before = session.get("/v2/models/simple/stats").json()["model_stats"][0]["inference_count"]
        assert session.post("/v2/models/simple/infer", content=gzip.compress(body.encode()),
                            headers={"content-encoding": "gzip"}).status_code == 200
        after = session.get("/v2/models/simple/versions/1/stats").json()["model_stats"][0]["inference_count"]
        assert after == before + 1
        refusals = [
            (session.get("/v2/models/simple/versions/x/stats"), 400,
             "failed to get model version from specified version string 'x' (details: stol), version should be an "
             "integral value > 0 ("),
            (session.post("/v2/models/simple/versions/1x/infer", content=body), 400,
             "failed to get model version from specified version string '1x'"),
            (session.get("/v2/models/simple/versions/2/ready"), 400, "Request for unknown model: 'simple' version 2"),
            (session.get("/v2/models/nosuch/stats"), 400, "requested model 'nosuch' is not available ("),
            (session.get("/v2/models/simple/versions/3/stats"), 400,
             "requested model version is not available for model 'simple' (the gateway serves the committed version"),
        ]
    for reply, status, message in refusals:
        assert (reply.status_code, reply.json()["error"][:len(message)]) == (status, message), reply.text


def test_nvidias_example_clients_pass_through_the_gateway_as_against_triton(simple: tuple[World, Running]) -> None:
    if not EXAMPLES or not Path(EXAMPLES, EXAMPLE_CLIENTS[0][0]).is_file():
        pytest.skip("set FERRY_TRITON_CLIENT_EXAMPLES to a copy of triton-inference-server/client's "
                    "src/python/examples to run NVIDIA's example clients unchanged")
    world, gateway = simple
    where = addresses(world, gateway)
    differ, failing = {}, {}
    for script, protocol in EXAMPLE_CLIENTS:
        results = {}
        for name, (http_url, grpc_url) in where.items():
            url = http_url if protocol == "http" else grpc_url
            done = subprocess.run([sys.executable, str(Path(EXAMPLES, script)), "-u", url], capture_output=True,
                                  text=True, timeout=120)
            passed = [line for line in done.stdout.splitlines() if line.startswith("PASS")]
            failed = [line for line in done.stdout.splitlines() if "FAILED" in line or "error" in line.lower()]
            results[name] = (done.returncode, passed, failed, done.stderr[-300:] if done.returncode else "")
        if results["gateway"] != results["triton"]:
            differ[script] = results
        if results["gateway"][0] != 0:
            failing[script] = results["gateway"]
    assert not failing, f"NVIDIA's examples that fail through the gateway: {failing}"
    assert not differ, f"NVIDIA's examples that do not fare the same through the gateway as against Triton: {differ}"
