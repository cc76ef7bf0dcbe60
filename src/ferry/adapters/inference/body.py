"""One way in for every inference body: ``/v2/.../infer``, ``/predict`` and the MLflow plugin's ``predict``.

Each path decodes its body here (:func:`decode_body`: identity, gzip or deflate, within the size limit), parses it
with the guard's strict JSON, and hands the guard's one input check (:func:`.guard.check_infer`) a KServe v2
request: a ``/predict`` document ``{"inputs": {name: nested list}}`` becomes one (:func:`predict_infer`), with
the shape its nesting declares and the datatype the model's config gives. So a request is refused, or not, for
the same reason whichever path it took, and the paths cannot drift apart.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from ferry.adapters.inference.guard import HttpInfer, parse_json, refused
from ferry.adapters.inference.routing import Route
from ferry.core.errors import BadRequest, TooLarge, UnsupportedEncoding

PREDICT_HINT = 'send {"inputs": {"<input name>": <nested list>}}'


def decode_body(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """The body, inflated if the client compressed it (``Content-Encoding``: gzip or deflate; tritonclient's
    request_compression_algorithm); 415 for any other encoding, 413 if it inflates past ``limit``."""
    if encoding is None or encoding in (b"", b"identity"):
        return body
    if encoding not in (b"gzip", b"deflate"):
        raise UnsupportedEncoding(f"Content-Encoding {encoding.decode(errors='replace')!r:.40} is not served",
                           "send the body as is, or with gzip or deflate")
    inflater = zlib.decompressobj(wbits=47)  # a gzip or zlib header, whichever it is
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise BadRequest(f"the {encoding.decode()} body does not inflate: {error}",
                           "compress the whole body, or send it as is") from None
    if len(plain) > limit:
        raise TooLarge(f"the body inflates to over the gateway's limit of {limit} bytes", "split the request")
    if not inflater.eof:
        raise BadRequest(f"the {encoding.decode()} body is truncated", "send the whole compressed body")
    return plain


def predict_document(body: bytes) -> dict:
    """A decoded /predict body ``{"inputs": {name: nested list}}``, parsed (once)."""
    document = parse_json(body)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), dict) or not document["inputs"]:
        raise refused("the body is not a /predict request", PREDICT_HINT)
    return document


def predict_infer(document: dict, route: Route) -> HttpInfer:
    """A /predict document as the KServe v2 request it stands for at ``route``: each input's shape is its nesting
    (row lengths of the first element at each level), its datatype the config's. An input the model does not
    have keeps no datatype, so that the check names it."""
    tensors = []
    for name, value in document["inputs"].items():
        spec = route.inputs.get(name)
        tensors.append({"name": name, "shape": nesting(value), "datatype": spec.datatype if spec else None,
                        "data": value if isinstance(value, list) else [value]})
    return HttpInfer({"inputs": tensors}, memoryview(b""), 0)


def nesting(value: Any) -> list[int]:
    """The shape a nested list declares: the length at each level, down its first elements."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def check_rows(request: HttpInfer) -> None:
    """After the guard passed a /predict request: every row at each level has the length its shape says (the guard
    counts values, and a ragged list can hold as many as a rectangular one)."""
    for tensor in request.document["inputs"]:
        if tensor["shape"] and not _rectangular(tensor["data"], tensor["shape"], 0):
            raise refused(f"input '{tensor['name']}' is not a tensor: its rows are not all of length "
                          f"{tensor['shape'][1:]}", "send a nested list whose rows at each level have the same length")


def _rectangular(value: list, shape: list[int], depth: int) -> bool:
    if len(value) != shape[depth]:
        return False
    if depth >= len(shape) - 1:
        return True  # the values themselves: their kinds were the guard's to check
    return all(type(row) is list and _rectangular(row, shape, depth + 1) for row in value)


def predict_body(inputs: dict[str, Any]) -> bytes:
    """``{"inputs": inputs}`` as the /predict body it would be (for a caller that holds arrays, not a body); the
    values must be what JSON carries: finite numbers, booleans, text."""
    parts = []
    for name, value in inputs.items():
        try:
            parts.append(f"{json.dumps(str(name))}:{json.dumps(value, allow_nan=False, default=_plain)}")
        except ValueError as error:  # NaN or Infinity (allow_nan=False), bytes that are not UTF-8
            raise refused(f"input '{name}' holds a value JSON cannot carry ({error})",
                          "send finite numbers, and strings as UTF-8 text: predict takes what /predict takes") from None
        except TypeError as error:
            raise refused(f"input '{name}' is not a tensor: {error}", "send arrays or nested lists") from None
    return ('{"inputs":{' + ",".join(parts) + "}}").encode()


def _plain(value: Any) -> Any:
    """What JSON makes of a numpy array or scalar, and of bytes (UTF-8 text, as /predict carries strings)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")  # a UnicodeDecodeError is a ValueError
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not an array, a number, a boolean or a string")
