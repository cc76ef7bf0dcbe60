"""The gateway's shared body decoder, /predict's translation to KServe, and Triton's words for versions."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from ferry.adapters.gateway.refusals import status_of
from ferry.adapters.gateway.wording import version_number
from ferry.adapters.inference import guard
from ferry.adapters.inference.body import check_rows, decode_body, predict_body, predict_document, predict_infer
from ferry.adapters.inference.routing import Route
from ferry.core.errors import GatewayError
from ferry.core.model_config import Signature, TensorSpec

ROUTE = Route("m", 3, Signature((TensorSpec("X", "FP32", (-1, 4)), TensorSpec("S", "BYTES", (-1,))),
                                (TensorSpec("Y", "FP32", (-1,)),)))


def verdict(body: bytes, encoding: bytes | None = None) -> str:
    """What /predict makes of a body: "ok" and the KServe request, or the status and the refusal."""
    try:
        request = predict_infer(predict_document(decode_body(body, encoding, 1 << 20)), ROUTE)
        guard.check_infer(request, ROUTE, 1 << 20)
        check_rows(request)
    except GatewayError as error:
        return f"{status_of(error)} {error}"
    return "ok " + json.dumps(request.document)


def test_predict_is_checked_as_the_kserve_request_its_nesting_declares() -> None:
    good = json.dumps({"inputs": {"X": [[1, 2, 3, 4.5]], "S": ["a", "b"]}}).encode()
    assert verdict(good) == 'ok {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, ' \
                            '4.5]]}, {"name": "S", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}'
    assert verdict(gzip.compress(good), b"gzip") == verdict(zlib.compress(good), b"deflate") == verdict(good)
    refused = {
        b'{"inputs": {"X": [[true, false, true, false]]}}': "400 input 'X' is FP32, and holds True",
        b'{"inputs": {"X": [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], []]}}': "400 input 'X' is not a tensor",
        b'{"inputs": {"X": [[1, 2, 3, 4], [5, 6, 7]]}}': "400 input 'X' has 7 values, its shape holds 8",
        b'{"inputs": {"Z": [[1, 2, 3, 4]]}}': "400 model 'm' has no input 'Z'",
        b'{"inputs": {"X": 5}}': "400 input 'X' has shape [], the model takes [-1, 4]",
        b'{"inputs": {}}': "400 the body is not a /predict request",
        b'{"inputs": {"X": [[NaN, 1, 2, 3]]}}': "400 the body is not valid JSON: NaN is not a JSON number",
    }
    for body, message in refused.items():
        assert verdict(body).startswith(message), (body, verdict(body))
    assert verdict(good, b"br").startswith("415 Content-Encoding 'br' is not served")
    assert verdict(b"\x1f\x8b garbage", b"gzip").startswith("400 the gzip body does not inflate")


def test_the_plugins_arrays_become_the_body_predict_would_receive() -> None:
    body = predict_body({"X": np.ones((1, 4), np.float32), "S": np.array([b"a", "b"], dtype=object)})
    assert json.loads(body) == {"inputs": {"X": [[1.0, 1.0, 1.0, 1.0]], "S": ["a", "b"]}}
    assert verdict(predict_body({"X": np.array([[True, False, True, False]])})).startswith("400 input 'X' is FP32, "
                                                                                           "and holds True")
    for inputs, message in (({"X": np.array([[np.nan, 1, 2, 3]])}, "input 'X' holds a value JSON cannot carry"),
                            ({"S": np.array([b"\xff"], dtype=object)}, "input 'S' holds a value JSON cannot carry"),
                            ({"X": object()}, "input 'X' is not a tensor")):
        with pytest.raises(GatewayError, match=message):
            predict_body(inputs)


@pytest.mark.parametrize(("text", "path", "number"), [
    ("", True, None), ("3", True, 3), ("007", True, 7), ("1x", False, 1), (" +2", False, 2), ("0", True, 0)])
def test_versions_are_read_as_triton_reads_them(text: str, path: bool, number: int | None) -> None:
    assert version_number(text, path) == number


@pytest.mark.parametrize(("text", "path", "message"), [
    ("x", False, "failed to get model version from specified version string 'x' (details: stol), version should "
                 "be an integral value > 0 ("),
    ("1x", True, "failed to get model version from specified version string '1x'"),
    ("99999999999999999999", False, "failed to get model version from specified version string '9999"),
    ("-1", False, "invalid model version specified '-1' , version should be an integral value > 0 ("),
    ("-1", True, "failed to get model version from specified version string '-1'")])
def test_a_version_string_triton_refuses_is_refused_in_its_words(text: str, path: bool, message: str) -> None:
    with pytest.raises(GatewayError) as refused:
        version_number(text, path)
    assert status_of(refused.value) == 400 and str(refused.value).startswith(message)
