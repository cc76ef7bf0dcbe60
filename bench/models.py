"""Models the benchmarks build for themselves."""

from __future__ import annotations


def large_model(megabytes: int) -> bytes:
    """A real ONNX model of about ``megabytes`` MB: Y = mean(X @ W) with a large W (the bulk of a big model)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    columns = megabytes * 1024 * 1024 // 16  # W is 4 x columns float32
    weights = np.random.default_rng(0).standard_normal((4, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]),
         helper.make_node("ReduceMean", ["XW"], ["Y"], axes=[1], keepdims=1)], "large",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(weights, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
