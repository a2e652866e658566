#!/usr/bin/env python3
"""Write fixtures/foreign-teacher.onnx: a small image classifier built with the `onnx` package's
helper API (a different producer than this project's exporter), plus reference outputs.

The model: Conv(1->8, 3x3, pad 1)-Relu-MaxPool(2)-Conv(8->16, 3x3, pad 1)-Relu-MaxPool(2)-
Flatten-Gemm(1024->10, transB=1); input `image` [N, 1, 32, 32] (symbolic N), output `scores`
[N, 10]; opset 13, IR 8; no metadata (a server needs --mean/--std for it). Seeded weights.

Also writes fixtures/foreign-teacher.io.json: 3 inputs as u8 pixels and the onnxruntime logits
for them after normalising with mean 0.1307 and std 0.3081.

    python3 -m pip install onnx==1.23.2 onnxruntime==1.31.1 numpy
    python3 scripts/make-foreign-teacher.py
"""
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent.parent / "fixtures"
rng = np.random.default_rng(0)


def init(name, shape, scale):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


weights = [
    init("w1", (8, 1, 3, 3), 0.3), init("b1", (8,), 0.1),
    init("w2", (16, 8, 3, 3), 0.1), init("b2", (16,), 0.1),
    init("w3", (10, 1024), 0.05), init("b3", (10,), 0.1),
]
nodes = [
    helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
    helper.make_node("Relu", ["c1"], ["r1"]),
    helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
    helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
    helper.make_node("Relu", ["c2"], ["r2"]),
    helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
    helper.make_node("Flatten", ["p2"], ["f"], axis=1),
    helper.make_node("Gemm", ["f", "w3", "b3"], ["scores"], transB=1),
]
graph = helper.make_graph(
    nodes,
    "foreign_teacher",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])],
    [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
    initializer=weights,
)
model = helper.make_model(graph, producer_name="onnx-helper", opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.checker.check_model(model, full_check=True)
OUT.mkdir(exist_ok=True)
onnx.save(model, OUT / "foreign-teacher.onnx")

import onnxruntime as ort  # noqa: E402

pixels = rng.integers(0, 256, size=(3, 1, 32, 32), dtype=np.uint8)
x = ((pixels.astype(np.float32) / 255.0) - 0.1307) / 0.3081
session = ort.InferenceSession(str(OUT / "foreign-teacher.onnx"), providers=["CPUExecutionProvider"])
logits = session.run(None, {"image": x})[0]
(OUT / "foreign-teacher.io.json").write_text(
    json.dumps({"mean": 0.1307, "std": 0.3081, "pixels": pixels.flatten().tolist(), "logits": logits.flatten().tolist()})
)
print("wrote", OUT / "foreign-teacher.onnx", "and its reference outputs")
