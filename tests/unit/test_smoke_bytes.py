"""smoke.json's BYTES tensors: any byte string survives the file (UTF-8 text as JSON strings, anything else as
{"b64": ...}), files written before that read back as bytes, and golden BYTES outputs compare with Triton's bytes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from ferry.core.errors import InvalidInput
from ferry.core.model_config import Signature, TensorSpec
from ferry.core.smoke import SmokeSample, dump_sample, load_sample, output_problems, synthetic_sample
from ferry.publish import golden_outputs

ITEMS = [b"he\x00llo", b"trail\x00", b"", b"\x00", "d\u00e9j\u00e0 \u2603".encode(), b"\xff\xfe", b"ok\x80", b"\xc3",
         bytes(range(256)), b"b'0'"]

# What ferry wrote before BYTES were encoded (a str sample, golden outputs of a str model): plain strings.
OLD_FILE = """{
 "inputs": {
  "INPUT0": {"datatype": "BYTES", "shape": [1, 3], "data": ["1", "he\\u0000llo", "d\\u00e9j\\u00e0"]}
 },
 "outputs": {
  "OUTPUT0": {"datatype": "BYTES", "shape": [1, 3], "data": ["1", "he\\u0000llo", "d\\u00e9j\\u00e0"]},
  "COUNT": {"datatype": "INT64", "shape": [1], "data": [3]}
 },
 "atol": 0.5
}"""


def objects(items: list, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(shape)


def strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def written(tmp_path: Path, sample: SmokeSample) -> tuple[dict, SmokeSample]:
    path = tmp_path / "smoke.json"
    path.write_text(dump_sample(sample))
    return strict_json(path.read_text()), load_sample(path)


def test_every_byte_string_survives_smoke_json(tmp_path: Path) -> None:
    tensor = objects(ITEMS, (2, 5))
    body, back = written(tmp_path, SmokeSample({"INPUT0": tensor}, {"OUTPUT0": tensor[:, ::-1]}))
    assert back.inputs["INPUT0"].dtype == np.object_ and back.inputs["INPUT0"].shape == (2, 5)
    assert back.inputs["INPUT0"].tolist() == tensor.tolist()
    assert back.golden["OUTPUT0"].tolist() == tensor[:, ::-1].tolist()
    assert all(type(item) is bytes for item in back.inputs["INPUT0"].ravel())
    data = body["inputs"]["INPUT0"]["data"]
    assert body["inputs"]["INPUT0"]["datatype"] == "BYTES"
    assert data[:5] == ["he\x00llo", "trail\x00", "", "\x00", "d\u00e9j\u00e0 \u2603"], "UTF-8 text stays readable"
    assert data[5:9] == [{"b64": base64.b64encode(item).decode()} for item in ITEMS[5:9]]
    assert data[9] == "b'0'"


def test_str_and_numpy_string_samples_are_written_as_their_utf8_bytes(tmp_path: Path) -> None:
    texts = ["a\x00b", "caf\u00e9", "x"]
    _, back = written(tmp_path, SmokeSample({"S": np.array(texts, dtype=object), "U": np.array([["a", "bc"]]),
                                             "B": np.array([b"a\x00b", b"\xff"], dtype="S")}, None))
    assert back.inputs["S"].tolist() == [t.encode() for t in texts]
    assert back.inputs["U"].tolist() == [[b"a", b"bc"]]
    assert back.inputs["B"].tolist() == [b"a\x00b", b"\xff"]
    assert back.golden is None


def test_numbers_are_written_as_before(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
    body, back = written(tmp_path, SmokeSample({"X": x}, {"label": np.array([1, 2], dtype=np.int64)}, 1e-3))
    assert body["inputs"]["X"] == {"datatype": "FP32", "shape": [2, 3], "data": x.ravel().tolist()}
    assert back.inputs["X"].dtype == np.float32 and np.array_equal(back.inputs["X"], x)
    assert back.golden["label"].dtype == np.int64 and back.rtol == 1e-3


def test_a_smoke_json_written_before_reads_back_as_bytes(tmp_path: Path) -> None:
    path = tmp_path / "smoke.json"
    path.write_text(OLD_FILE)
    sample = load_sample(path)
    want = [b"1", b"he\x00llo", "d\u00e9j\u00e0".encode()]
    assert sample.inputs["INPUT0"].tolist() == [want] and sample.golden["OUTPUT0"].tolist() == [want]
    assert sample.golden["COUNT"].tolist() == [3] and sample.atol == 0.5


@pytest.mark.parametrize("item, complaint", [
    ({"b64": "not base64!"}, "is not base64"),
    ({"b64": 7}, "a BYTES element is a string or"),
    ({"b64": "AA==", "x": 1}, "a BYTES element is a string or"),
    (12, "a BYTES element is a string or"),
    ("\udcff", "surrogates not allowed"),
])
def test_a_bytes_element_that_is_neither_text_nor_base64_is_refused_with_the_file_named(
        tmp_path: Path, item: object, complaint: str) -> None:
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps({"inputs": {"I": {"datatype": "BYTES", "shape": [2], "data": ["ok", item]}}}))
    with pytest.raises(InvalidInput, match=r"smoke\.json is not a valid smoke sample") as refused:
        load_sample(path)
    assert complaint in refused.value.message and "log the smoke sample again" in refused.value.hint


def signature(datatype: str = "BYTES", dims: tuple[int, ...] = (1, -1)) -> Signature:
    return Signature(inputs=(TensorSpec("INPUT0", datatype, dims),), outputs=(TensorSpec("OUTPUT0", datatype, dims),))


def test_golden_bytes_compare_with_tritons_bytes_and_a_difference_names_the_first_element(tmp_path: Path) -> None:
    path = tmp_path / "smoke.json"
    path.write_text(OLD_FILE)
    golden = load_sample(path).golden
    answer = objects([b"1", b"he\x00llo", "d\u00e9j\u00e0".encode()], (1, 3))  # as tritonclient answers
    assert output_problems(signature(), {"OUTPUT0": answer}, golden, 1e-5, 1e-5) == []
    cut = objects([b"1", b"he", "d\u00e9j\u00e0".encode()], (1, 3))  # what a numpy str array makes of a NUL
    assert output_problems(signature(), {"OUTPUT0": cut}, golden, 1e-5, 1e-5) == [
        "output 'OUTPUT0' differs from the golden output in 1 of 3 values (first at [0, 1]: b'he', golden "
        "b'he\\x00llo')"]
    as_repr = objects([b"b'1'", b"he\x00llo", "d\u00e9j\u00e0".encode()], (1, 3))  # str(bytes), the bug of old
    assert "differs from the golden output in 1 of 3" in output_problems(
        signature(), {"OUTPUT0": as_repr}, golden, 1e-5, 1e-5)[0]


def test_a_model_without_a_sample_is_smoked_on_the_text_zero() -> None:
    sample = synthetic_sample(signature())
    assert sample.inputs["INPUT0"].tolist() == [[b"0"]] and sample.inputs["INPUT0"].dtype == np.object_


def _model(nodes: list, dims: list[int], inputs: tuple[str, ...] = ("INPUT0",)) -> bytes:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.STRING, dims) for n in inputs],
                              [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, dims)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


ECHO = _model([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], [1, -1])
ADD = _model([helper.make_node("Cast", ["INPUT0"], ["A"], to=TensorProto.INT32),
              helper.make_node("Cast", ["INPUT1"], ["B"], to=TensorProto.INT32),
              helper.make_node("Add", ["A", "B"], ["C"]),
              helper.make_node("Cast", ["C"], ["OUTPUT0"], to=TensorProto.STRING)], [1, 4], ("INPUT0", "INPUT1"))


@pytest.mark.parametrize("build, items", [
    (lambda items: objects(items, (1, len(items))), [b"he\x00llo", b"trail\x00", b"", "\u2603".encode()]),  # NVIDIA's
    (lambda items: objects([i.decode() for i in items], (1, len(items))), [b"he\x00llo", b"trail\x00", b"\x00"]),
    # A numpy str array (numpy itself drops trailing NULs): onnxruntime alone would cut "he\0llo" to "he".
    (lambda items: np.array([[i.decode() for i in items]]), [b"he\x00llo", b"", "d\u00e9j\u00e0".encode()]),
])
def test_golden_outputs_of_a_string_model_are_the_bytes_it_answers(build, items: list[bytes]) -> None:
    assert golden_outputs(ECHO, {"INPUT0": build(items)})["OUTPUT0"].tolist() == [items]
    digits = build([b"1", b"-20", b"300", b"0"])
    assert golden_outputs(ADD, {"INPUT0": digits, "INPUT1": digits})["OUTPUT0"].tolist() == [[b"2", b"-40", b"600",
                                                                                              b"0"]]


def test_golden_outputs_refuse_a_sample_that_is_not_utf8_and_name_the_element() -> None:
    with pytest.raises(InvalidInput, match=r"sample input 'INPUT0' at \[0, 2\] is not UTF-8 \(b'\\xff': "
                                           "invalid start byte\\)") as refused:
        golden_outputs(ECHO, {"INPUT0": objects([b"a", b"b", b"\xff"], (1, 3))})
    assert "onnxruntime's string tensors hold text" in refused.value.hint


def test_the_gateways_predict_answer_keeps_every_byte_of_a_bytes_output() -> None:
    from ferry.adapters.gateway.app import _outputs

    # Triton's JSON answer as it writes it: UTF-8 as is, NUL escaped, any other byte unescaped (not UTF-8).
    answer = (b'{"model_name":"echo","outputs":[{"name":"OUTPUT0","datatype":"BYTES","shape":[1,5],'
              b'"data":["a\\u0000b","\xc3\xa9","trail\\u0000","caf\xe9","\xff\xfe"]},'
              b'{"name":"N","datatype":"FP32","shape":[2],"data":[1.5,2.0]}]}')
    outputs = _outputs(answer)
    assert outputs == {"OUTPUT0": [["a\x00b", "\u00e9", "trail\x00", {"b64": "Y2Fm6Q=="}, {"b64": "//4="}]],
                       "N": [1.5, 2.0]}
    assert base64.b64decode(outputs["OUTPUT0"][0][3]["b64"]) == b"caf\xe9"
    json.dumps(outputs, ensure_ascii=False).encode()  # what the JSON response does: must not raise
