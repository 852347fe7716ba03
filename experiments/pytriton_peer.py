"""A fused convcache model served by NVIDIA's PyTriton: Triton Inference Server in front of a Python
callable running ONNX Runtime, with Triton's dynamic batcher set as `convcache triton` sets it (preferred
8 and 32, max 32, 5 ms queue delay). The peer that experiments/bench_perf_analyzer.py measures us against.

Runs in the venv `make tritonserver` builds (PyTriton pins numpy<2, so it cannot share convcache's):

    .tools/tritonserver/env/bin/python experiments/pytriton_peer.py --model runs/model.onnx \
        --http-port 8000 --grpc-port 8001 --metrics-port 8002

It imports only numpy, onnxruntime and pytriton (not convcache): the graph's own input and output names
and shapes configure the bound model."""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a fused .onnx from `convcache fuse`")
    p.add_argument("--name", default="m")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--delay-us", type=int, default=5000)
    a = p.parse_args()
    # imported after the arguments: `--help` answers in any venv (pytriton lives in .tools/tritonserver/env)
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    session = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]

    @batch
    def infer(**inputs):
        return dict(zip(outputs, session.run(outputs, {image.name: inputs[image.name]})))

    config = TritonConfig(http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port)
    # PyTriton 0.7 guards the statistics endpoint with a generated token; perf_analyzer reads it (the server
    # side's queue and compute split), as it reads ours and plain tritonserver's: open it here
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(model_name=a.name, infer_func=infer,
                    inputs=[Tensor(name=image.name, dtype=np.float32, shape=tuple(image.shape[1:]))],
                    outputs=[Tensor(name=o.name, dtype=np.float32, shape=tuple(o.shape[1:]))
                             for o in session.get_outputs()],
                    config=ModelConfig(max_batch_size=a.max_batch, batcher=DynamicBatcher(
                        max_queue_delay_microseconds=a.delay_us, preferred_batch_size=[8, a.max_batch])))
        triton.serve()


if __name__ == "__main__":
    main()
