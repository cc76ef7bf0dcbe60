"""The plugin's ``predict``: MLflow's inputs (a DataFrame, a dict or a list of arrays) as the body the gateway's
/predict would get, through the gateway's one decoder and input check, at the committed version."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.deployments import PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ferry.core.errors import TritonError
from ferry.core.services import Services

if TYPE_CHECKING:
    from ferry.adapters.inference.routing import Route


def refused(message: str, hint: str = "", code: int = INVALID_PARAMETER_VALUE) -> MlflowException:
    """ferry's one line for MLflow: what was wrong, and (in parentheses) what to do."""
    return MlflowException(f"{message} ({hint})" if hint else message, error_code=code)


def _cells(column: Any) -> np.ndarray:
    return np.stack([np.asarray(cell) for cell in column])


def _from_frame(frame: Any, names: list[str], model: str) -> dict[str, Any]:
    """A DataFrame as named inputs: one column per input (a row per item), the Triton plugin's layout
    (one column, one row per input, each cell a tensor), or, for a model with one input, the whole frame."""
    columns = [str(c) for c in frame.columns]
    if set(columns) == set(names) and len(frame):
        return {str(c): _cells(frame[c]) for c in frame.columns}
    if len(columns) == 1 and {str(i) for i in frame.index} == set(names):
        return {str(i): np.asarray(frame[frame.columns[0]][i]) for i in frame.index}
    if len(names) == 1:
        return {names[0]: frame.to_numpy()}
    raise refused(f"a DataFrame for '{model}' needs one column per input {names} (a row per item), or one "
                   f"column indexed by the inputs' names; it has columns {columns[:20]}")


def named_inputs(inputs: Any, names: list[str], model: str) -> dict[str, Any]:
    """``inputs`` (a DataFrame, a dict of arrays, a list of arrays in the model's input order, or an array for a
    model with one input) as {input name: array or nested list}."""
    import pandas as pd

    if isinstance(inputs, pd.DataFrame):
        return _from_frame(inputs, names, model)
    if isinstance(inputs, Mapping):
        return {str(k): v for k, v in inputs.items()}
    if isinstance(inputs, np.ndarray) and len(names) == 1:
        return {names[0]: inputs}
    if isinstance(inputs, list | tuple):
        if len(names) == 1 and not all(isinstance(i, np.ndarray) for i in inputs):
            return {names[0]: inputs}  # a nested list: the one input's data
        if len(inputs) == len(names):
            return dict(zip(names, inputs))
        raise refused(f"'{model}' takes {len(names)} inputs {names}; the list gives {len(inputs)}")
    raise refused(f"predict takes a pandas DataFrame, a dict of arrays or a list of arrays; got "
                   f"{type(inputs).__name__}", f"'{model}' takes the inputs {names}")


def _jsonable(value: np.ndarray) -> Any:
    if value.dtype.kind in "OS":
        return np.vectorize(lambda x: x.decode() if isinstance(x, bytes) else x, otypes=[object])(value).tolist()
    return value.tolist()


def _infer(ferry: Services, route: Route, document: dict[str, Any]) -> dict[str, Any]:
    """A /predict document at one route: the gateway's one input check (:mod:`ferry.adapters.inference.body`), then
    Triton."""
    from tritonclient.utils import triton_to_np_dtype

    from ferry.adapters.inference import guard
    from ferry.adapters.inference.body import check_rows, predict_infer

    request = predict_infer(document, route)
    guard.check_infer(request, route, ferry.settings.gateway.max_elements)
    check_rows(request)
    tensors = request.document["inputs"]
    arrays = {t["name"]: np.asarray(t["data"], dtype=triton_to_np_dtype(t["datatype"])).reshape(t["shape"])
              for t in tensors}
    datatypes = {t["name"]: t["datatype"] for t in tensors}
    outputs = ferry.triton.infer(route.upstream, route.version, arrays, datatypes)
    return {name: _jsonable(value) for name, value in outputs.items()}


def predict_committed(ferry: Services, model: str, inputs: Any) -> PredictionsResponse:
    """Inference at the committed version, as the gateway's /predict does it: the inputs as the /predict body they
    would be, through its decoder and input check (so the plugin refuses what /predict refuses, for the same
    reason), routing, and one retry when a commit retired the version while the request ran."""
    from ferry.adapters.inference.body import predict_body, predict_document
    from ferry.adapters.inference.routing import Router

    router = Router(ferry.settings.repository)
    route = router.route(model)
    named = named_inputs(inputs, [spec.name for spec in route.signature.inputs], model)
    document = predict_document(predict_body(named))
    try:
        outputs = _infer(ferry, route, document)
    except TritonError:
        newer = router.route(model)
        if newer.version == route.version:
            raise
        route, outputs = newer, _infer(ferry, newer, document)
    return PredictionsResponse({"predictions": outputs, "model": model, "version": route.version})
