"""The peer for `convcache bench serve --peer litserve`: the same fused model behind LitServe, with the same
decode and inference code (`convcache.serve.Predictor`), so that only the serving framework differs. LitServe's
own batching (`max_batch_size`, `batch_timeout`) plays the part of convcache's micro-batcher.

    python -m convcache.benchmarks.litserve_peer MODEL PORT MAX_BATCH BATCH_TIMEOUT_S
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np


class FusedModelAPI(ls.LitAPI):
    def __init__(self, model: str, max_batch: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout)
        self.model = model

    def setup(self, device):
        from convcache.serve import Predictor

        self.predictor = Predictor(self.model, "cpu")

    def decode_request(self, request):
        upload = request["image"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return self.predictor.to_pixels(data)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.predictor.run_pixels(x)[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        p = self.predictor.postprocess(output)
        return {"predictions": [p.to_dict()]}


def main() -> None:
    model, port, max_batch, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    api = FusedModelAPI(model, max_batch, timeout)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120).run(port=port, generate_client_file=False)


if __name__ == "__main__":
    main()
