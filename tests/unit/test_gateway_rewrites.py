"""The gateway's byte-level rewrites: a request addressed to the store, an answer named as the client asked."""

from __future__ import annotations

import json

import pytest
from tritonclient.grpc import service_pb2

from ferry.adapters.gateway.kserve_grpc import _at_store, _named
from ferry.adapters.gateway.kserve_http import BINARY_HEADER, served_as
from ferry.adapters.inference.routing import Route
from ferry.core.model_config import Signature


def _route(model: str, version: int = 7, behind_front: bool = True) -> Route:
    return Route(model, version, Signature((), ()), behind_front=behind_front)


@pytest.mark.parametrize("model", ["iris", "m" * 120, "x" * 128])  # a store name of 128 bytes or more: 2-byte length
def test_a_grpc_request_is_addressed_to_the_store_whatever_the_names_length(model: str) -> None:
    request = service_pb2.ModelInferRequest(model_name=model, model_version="", id="r1")
    sent = service_pb2.ModelInferRequest.FromString(_at_store(request.SerializeToString(), _route(model)))
    assert (sent.model_name, sent.model_version, sent.id) == (f"{model}.versions.7", "7", "r1")
    answer = service_pb2.ModelInferResponse(model_name=f"{model}.versions.7", model_version="7")
    named = service_pb2.ModelInferResponse.FromString(_named(answer.SerializeToString(), _route(model)))
    assert (named.model_name, named.model_version) == (model, "7")


def test_a_model_not_behind_a_front_is_called_by_its_own_name() -> None:
    assert _route("iris", behind_front=False).upstream == "iris"
    assert _route("iris").upstream == "iris.versions.7"


@pytest.mark.parametrize("request_id", ["", "r1", "x" * 300])  # Triton writes the id before the model's name
def test_an_http_answer_names_the_model_and_keeps_its_binary_part(request_id: str) -> None:
    head = {"model_name": "iris.versions.7", "model_version": "7", "outputs": [{"name": "Y", "datatype": "FP32",
                                                                               "shape": [1], "parameters":
                                                                                   {"binary_data_size": 4}}]}
    if request_id:
        head = {"id": request_id, **head}
    header = json.dumps(head, separators=(",", ":")).encode()
    body, headers = served_as(_route("iris"), header + b"\x00\x00\x80?", {BINARY_HEADER: str(len(header)).encode()})
    length = int(headers[BINARY_HEADER])
    assert json.loads(body[:length])["model_name"] == "iris" and body[length:] == b"\x00\x00\x80?"
    plain, _ = served_as(_route("iris"), header, {})
    assert json.loads(plain)["model_name"] == "iris"
