"""The `model.py` that `convcache triton --backend python` copies beside `1/model.onnx`: Triton's python
backend running a fused convcache model with ONNX Runtime, for tritonserver builds that ship only the
python backend (PyPI's `nvidia-pytriton`).

It runs inside Triton's python-backend stub, not in convcache: it imports numpy, onnxruntime and the
stub's `triton_python_backend_utils`, never convcache (the stub's interpreter needs only numpy and
onnxruntime; a repository is meant to be copied to a serving box). Everything it needs is in the model
configuration Triton hands it: tensor names, the instance kind and device, and the `intra_op_threads`
parameter. Triton's dynamic batcher hands `execute` several requests at once: their inputs go through
the graph as one batch (one `InferenceSession.run`), and each request gets its own rows back."""

from __future__ import annotations

import json
import os

import numpy as np


class TritonPythonModel:
    """Triton's python-backend interface: `initialize`, `execute`, `finalize`."""

    def initialize(self, args: dict) -> None:
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.inputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "")
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=providers)

    def execute(self, requests: list) -> list:
        pb = self.pb
        batches, sizes = {}, []
        for request in requests:
            n = None
            for name, dtype in self.inputs:
                tensor = pb.get_input_tensor_by_name(request, name)
                array = np.asarray(tensor.as_numpy(), dtype=dtype)
                batches.setdefault(name, []).append(array)
                n = array.shape[0]
            sizes.append(n)
        try:
            feed = {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in batches.items()}
            results = self.session.run(self.outputs, feed)
        except Exception as error:  # one failed run fails the requests it carried, with the runtime's reason
            return [pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(error))) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensors = [pb.Tensor(name, np.ascontiguousarray(value[start:start + n]))
                       for name, value in zip(self.outputs, results)]
            responses.append(pb.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def finalize(self) -> None:
        self.session = None
