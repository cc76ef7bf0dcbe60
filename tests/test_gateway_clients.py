"""The official Triton clients, unchanged, against the gateway: HTTP (JSON, binary, compressed) and gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import World
from support.gateway import IRIS_ROW, TOKEN, Running, auth, running_gateway

ROW = np.array([IRIS_ROW], dtype=np.float32)


@pytest.fixture
def gateway(world: World) -> Iterator[Running]:
    with running_gateway(world) as running:
        yield running


def http_input(binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("X", [1, 4], "FP32")
    tensor.set_data_from_numpy(ROW, binary_data=binary)
    return tensor


def grpc_input() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("X", [1, 4], "FP32")
    tensor.set_data_from_numpy(ROW)
    return tensor


def refusal(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def check_http(triton: httpclient.InferenceServerClient, version: int) -> None:
    other = str(version + 1)
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("iris", headers=auth())
    assert triton.is_model_ready("iris", str(version), headers=auth())
    assert not triton.is_model_ready("iris", other, headers=auth())
    extensions = triton.get_server_metadata()["extensions"]
    assert "binary_tensor_data" in extensions and "model_repository" not in extensions
    metadata = triton.get_model_metadata("iris", headers=auth())
    assert metadata["versions"] == [str(version)] and metadata["inputs"][0]["shape"] == [-1, 4]
    config = triton.get_model_config("iris", headers=auth())
    assert config["version_policy"] == {"specific": {"versions": [version]}}
    for binary in (False, True):
        outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        answer = triton.infer("iris", [http_input(binary)], outputs=outputs, headers=auth())
        assert answer.as_numpy("probabilities").shape == (1, 3)
        assert answer.get_response()["model_version"] == str(version)
    answer = triton.infer("iris", [http_input(True)], model_version=str(version), headers=auth(),
                          request_compression_algorithm="gzip", response_compression_algorithm="gzip")
    assert answer.as_numpy("label").shape == (1,)
    error = refusal(triton.infer, "iris", [http_input(False)], model_version=other, headers=auth())
    assert error.status() == "404" and f"the committed version, v{version}" in error.message()
    error = refusal(triton.get_model_metadata, "iris", other, headers=auth())
    assert error.status() == "404"
    assert refusal(triton.infer, "iris", [http_input(False)]).status() == "401"


def check_grpc(triton: grpcclient.InferenceServerClient, version: int) -> None:
    other = str(version + 1)
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("iris", headers=auth())
    assert "model_repository" not in triton.get_server_metadata().extensions
    assert list(triton.get_model_metadata("iris", headers=auth()).versions) == [str(version)]
    config = triton.get_model_config("iris", str(version), headers=auth()).config
    assert list(config.version_policy.specific.versions) == [version]
    answer = triton.infer("iris", [grpc_input()], headers=auth(), client_timeout=30)
    assert answer.as_numpy("probabilities").shape == (1, 3)
    assert answer.get_response().model_version == str(version)
    error = refusal(triton.infer, "iris", [grpc_input()], model_version=other, headers=auth(), client_timeout=30)
    assert error.status() == "StatusCode.NOT_FOUND" and f"the committed version, v{version}" in error.message()
    assert not triton.is_model_ready("iris", other, headers=auth())  # as Triton answers it: not ready, no error
    assert refusal(triton.get_model_config, "iris", other, headers=auth()).status() == "StatusCode.NOT_FOUND"
    assert refusal(triton.infer, "iris", [grpc_input()], client_timeout=30).status() == "StatusCode.UNAUTHENTICATED"
    too_big = grpc_input()
    too_big._input.shape[:] = [1_000_000_000_000, 4]  # what crashes Triton 2.51 over JSON; refused on gRPC too
    error = refusal(triton.infer, "iris", [too_big], headers=auth(), client_timeout=30)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "over the gateway's limit" in error.message()


def test_the_official_clients_see_the_committed_version_only(world: World, gateway: Running) -> None:
    world.register()
    assert world.deploy().outcome == "committed"
    http = httpclient.InferenceServerClient(gateway.host_port, network_timeout=30)
    grpc = grpcclient.InferenceServerClient(gateway.grpc)
    try:
        check_http(http, 1)
        check_grpc(grpc, 1)
        world.register(trees=5)
        assert world.deploy().outcome == "committed"  # metadata and config are cached per version: now v2's
        check_http(http, 2)
        check_grpc(grpc, 2)
    finally:
        http.close()
        grpc.close()
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'ferry_gateway_requests_total{code="200",model="iris",protocol="grpc",role="active",version="2"}' in metrics
    assert 'ferry_gateway_requests_total{code="404",model="iris",protocol="grpc",role="active",version="2"}' in metrics


def test_every_error_is_the_protocols_error_body(world: World, gateway: Running) -> None:
    """FastAPI's own 404, 405 and 422 included: tritonclient decodes {"error": ...}, never {"detail": ...}."""
    world.register()
    world.deploy()
    with httpx.Client(base_url=gateway.url, timeout=10, headers={"authorization": f"Bearer {TOKEN}"}) as session:
        replies = [session.get("/"), session.get("/v2/models"), session.delete("/predict/iris"),
                   session.put("/v2/models/iris/infer"), session.get("/v2/models/iris/versions/x/config"),
                   session.get("/v2/models/iris/versions//ready"), session.post("/healthz"),
                   session.get("/v2/models/iris/trace/setting"), session.post("/v2/repository/models/iris/load")]
    for reply in replies:
        assert 400 <= reply.status_code < 500, (reply.request.method, reply.request.url, reply.status_code)
        body = json.loads(reply.content)
        assert list(body) == ["error"] and body["error"], (reply.request.url, reply.text)
