"""How an S3 client's errors read as ferry's (ferry.core.mlflow_rest.s3_failure): the refused credential is named."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from ferry.core.errors import InvalidInput, RegistryError, Unavailable
from ferry.core.mlflow_rest import s3_failure

ENDPOINT = "http://127.0.0.1:9000"


def refused(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "refused"}}, "ListObjectsV2")


@pytest.mark.parametrize(("code", "named"), [
    ("InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"),
    ("SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"),
    ("AccessDenied", "AWS_ACCESS_KEY_ID"),
])
def test_refused_credentials_name_the_variable_in_the_message(code: str, named: str) -> None:
    error = s3_failure("listing s3://b/p", refused(code), ENDPOINT)
    assert isinstance(error, InvalidInput) and not error.retryable
    assert code in error.message and named in error.message, error.message


def test_a_missing_object_is_not_found_and_a_store_that_does_not_answer_is_unavailable() -> None:
    assert isinstance(s3_failure("downloading model.onnx", refused("NoSuchKey"), ENDPOINT), RegistryError)
    down = s3_failure("listing s3://b/p", EndpointConnectionError(endpoint_url=ENDPOINT), ENDPOINT)
    assert isinstance(down, Unavailable) and down.retryable and ENDPOINT in down.message
    failing = s3_failure("downloading model.onnx", refused("InternalError"), ENDPOINT)
    assert isinstance(failing, Unavailable) and "InternalError" in failing.message
