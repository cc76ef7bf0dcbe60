"""String (BYTES) models, end to end with the real Triton: logged with ferry.publish, deployed by ferry, and
answered byte for byte to Triton's own clients (HTTP and gRPC, on Triton and through the gateway) and by the
gateway's /predict.

``simple_string`` is Triton's example model (INPUT0, INPUT1 BYTES [1, 16] holding decimal strings; OUTPUT0 the
sum, OUTPUT1 the difference, as strings), built here in ONNX (Cast string to INT32, Add, Sub, Cast back).
``echo`` is an Identity over strings: what goes in must come out, NUL bytes included.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import mlflow
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from train_model import use_experiment
from tritonclient.utils import InferenceServerException

from conftest import FAKES, World
from ferry.core.smoke import SMOKE_FILE, load_sample
from ferry.publish import log_onnx_model, register_version
from support.gateway import TOKEN, Running, running_gateway

# Text with NULs inside, at the start and the end, empty, multi-byte UTF-8, a whole NUL string.
TEXTS = [b"he\x00llo", b"\x00lead", b"trail\x00", b"", "d\u00e9j\u00e0 vu \u2603".encode(), b"\x00", b"plain",
         b"tab\tnew\nline", "\U0001f680".encode(), b"\\x00 not a NUL", b"'quoted'", b"b'0'"]
NOT_UTF8 = [b"\xff\xfe", b"ok\x80", b"\xc3"]  # bytes UTF-8 never uses, a stray continuation, a cut sequence


def objects(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """A BYTES tensor as NVIDIA's clients build one: an object array of bytes."""
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(shape)


def simple_string() -> bytes:
    ints = [helper.make_node("Cast", [f"INPUT{i}"], [f"I{i}"], to=TensorProto.INT32) for i in (0, 1)]
    nodes = [*ints, helper.make_node("Add", ["I0", "I1"], ["SUM"]), helper.make_node("Sub", ["I0", "I1"], ["DIFF"]),
             helper.make_node("Cast", ["SUM"], ["OUTPUT0"], to=TensorProto.STRING),
             helper.make_node("Cast", ["DIFF"], ["OUTPUT1"], to=TensorProto.STRING)]
    return _model(nodes, ["INPUT0", "INPUT1"], ["OUTPUT0", "OUTPUT1"], [1, 16])


def echo() -> bytes:
    return _model([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], ["INPUT0"], ["OUTPUT0"], [1, -1])


def _model(nodes: list, inputs: list[str], outputs: list[str], dims: list[int]) -> bytes:
    def tensors(names: list[str]) -> list:
        return [helper.make_tensor_value_info(name, TensorProto.STRING, dims) for name in names]
    graph = helper.make_graph(nodes, "strings", tensors(inputs), tensors(outputs))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def publish(world: World, model: str, model_bytes: bytes, sample: dict[str, np.ndarray]) -> int:
    mlflow.set_tracking_uri(world.settings.tracking_uri)
    use_experiment("ferry-bytes")  # by name in this world's database: another test's experiment id means nothing here
    world.model = model
    with mlflow.start_run() as run:
        source = log_onnx_model(model_bytes, sample)
    return register_version(model, source, run.info.run_id, "champion", tracking_uri=world.settings.tracking_uri)


def clients(world: World, through: Running | None = None) -> list[tuple[str, Callable]]:
    """Infer over HTTP and gRPC on Triton itself (or ``through`` the gateway): {output: object array of bytes}."""
    http_at, grpc_at = (through.host_port, through.grpc) if through else \
        (world.settings.triton.endpoint.host_port, world.settings.triton.grpc.host_port)
    http = httpclient.InferenceServerClient(http_at, network_timeout=30)
    grpc = grpcclient.InferenceServerClient(grpc_at)
    headers = {"authorization": f"Bearer {TOKEN}"} if through else None

    def over(module, client, **timeout: float) -> Callable:
        def infer(model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            tensors = []
            for name, value in inputs.items():
                tensors.append(module.InferInput(name, list(value.shape), "BYTES"))
                tensors[-1].set_data_from_numpy(value)
            result = client.infer(model, tensors, headers=dict(headers) if headers else None, **timeout)
            return {out: result.as_numpy(out) for out in ("OUTPUT0", "OUTPUT1") if result.as_numpy(out) is not None}
        return infer

    return [("http", over(httpclient, http)), ("grpc", over(grpcclient, grpc, client_timeout=30))]


def test_simple_string_deploys_with_a_bytes_sample_and_answers_sums_as_strings(world: World) -> None:
    rng = np.random.default_rng(20)
    a, b = rng.integers(-1000, 1000, (2, 1, 16))
    as_text = np.vectorize(lambda n: str(n).encode(), otypes=[object])
    version = publish(world, "simple_string", simple_string(), {"INPUT0": as_text(a), "INPUT1": as_text(b)})

    report = world.deploy()
    assert report.outcome == "committed", report.error
    golden = load_sample(world.model_dir.version_dir(version) / SMOKE_FILE).golden
    assert golden["OUTPUT0"].tolist() == as_text(a + b).tolist(), "the golden outputs are not the sums, as bytes"

    x, y = rng.integers(-(2**20), 2**20, (2, 1, 16))
    for protocol, infer in clients(world):
        answer = infer("simple_string", {"INPUT0": as_text(x), "INPUT1": as_text(y)})
        assert answer["OUTPUT0"].dtype == np.object_ and answer["OUTPUT0"].shape == (1, 16), protocol
        assert answer["OUTPUT0"].tolist() == as_text(x + y).tolist(), protocol
        assert answer["OUTPUT1"].tolist() == as_text(x - y).tolist(), protocol


def test_a_string_identity_model_answers_nul_bytes_unchanged_and_refuses_bytes_that_are_not_utf8(
        world: World) -> None:
    version = publish(world, "echo", echo(), {"INPUT0": objects(TEXTS, (1, len(TEXTS)))})
    report = world.deploy()
    assert report.outcome == "committed", report.error  # smoke compared Triton's answer with these golden bytes:
    assert load_sample(world.model_dir.version_dir(version) / SMOKE_FILE).golden["OUTPUT0"].tolist() == [TEXTS]

    for protocol, infer in clients(world):
        answer = infer("echo", {"INPUT0": objects(TEXTS, (1, len(TEXTS)))})["OUTPUT0"]
        assert answer.tolist() == [TEXTS], f"{protocol}: {answer.tolist()}"
        assert all(type(item) is bytes for item in answer.ravel()), protocol
        for bad in NOT_UTF8:
            with pytest.raises(InferenceServerException, match=r"input 'INPUT0' at \[0, 1\] is not UTF-8"):
                infer("echo", {"INPUT0": objects([b"fine", bad], (1, 2))})


def test_predict_answers_strings_byte_for_byte_and_bytes_that_are_not_utf8_as_base64(world: World) -> None:
    texts = [item.decode() for item in TEXTS]
    publish(world, "echo", echo(), {"INPUT0": objects(TEXTS, (1, len(TEXTS)))})
    assert world.deploy().outcome == "committed"
    with running_gateway(world) as gateway, httpx.Client(base_url=gateway.url, timeout=30,
                                                         headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        reply = session.post("/predict/echo", json={"inputs": {"INPUT0": [texts]}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["outputs"] == {"OUTPUT0": [texts]}
        for protocol, infer in clients(world, through=gateway):
            assert infer("echo", {"INPUT0": objects(TEXTS, (1, len(TEXTS)))})["OUTPUT0"].tolist() == [TEXTS], protocol

        # A backend that answers bytes that are not UTF-8 (ferry's runner cannot): base64, marked as in smoke.json.
        publish(world, "echo", echo(), {"INPUT0": objects([b"ascii", b"a\x00b"], (1, 2))})
        report = world.deploy(python_runner=FAKES / "fake_latin1_runner.py")
        assert report.outcome == "committed", report.error
        reply = session.post("/predict/echo", json={"inputs": {"INPUT0": [["caf\u00e9", "a\x00b", "\u00ff\u00fe"]]}})
        assert reply.status_code == 200, reply.text
        b64 = {"b64": base64.b64encode(b"caf\xe9").decode()}, {"b64": base64.b64encode(b"\xff\xfe").decode()}
        assert reply.json() == {"model": "echo", "version": 2, "outputs": {"OUTPUT0": [[b64[0], "a\x00b", b64[1]]]}}
