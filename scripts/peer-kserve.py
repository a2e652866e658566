"""Serve an ONNX image classifier with KServe's Python model server (the Open Inference
Protocol, "KServe v2"): the foreign peer of the v2 teacher client's tests and of the README's
KServe example. The model runs in ONNX Runtime; the input is FP32 [N, C, H, W] as the model
file declares it (the client normalises), the output its first.

    pip install "kserve==0.21.0" "onnxruntime==1.31.1"
    MODEL=fixtures/foreign-teacher.onnx NAME=foreign PORT=8000 python scripts/peer-kserve.py

(Settings come from the environment: KServe's server parses the command line itself.)
"""

import os

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


def dims(shape):
    """An ONNX shape as v2 metadata writes it: -1 for a symbolic dimension."""
    return [d if isinstance(d, int) else -1 for d in shape]


class OnnxClassifier(Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.output = self.session.get_outputs()[0]
        self.ready = True

    def get_input_types(self):
        return [{"name": self.input.name, "datatype": "FP32", "shape": dims(self.input.shape)}]

    def get_output_types(self):
        return [{"name": self.output.name, "datatype": "FP32", "shape": dims(self.output.shape)}]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32)
        y = self.session.run([self.output.name], {self.input.name: x})[0]
        out = InferOutput(name=self.output.name, shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)


if __name__ == "__main__":
    model = OnnxClassifier(os.environ.get("NAME", "foreign"), os.environ["MODEL"])
    ModelServer(http_port=int(os.environ.get("PORT", "8000")), enable_grpc=False, workers=1).start([model])
