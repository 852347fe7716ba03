"""The peer for `convcache bench serve --peer litserve`: the same fused model behind LitServe, with the same
decode and inference code (`convcache.serve.Predictor.predict` on each batch), so that only the serving
framework differs. LitServe's own batching (`max_batch_size`, `batch_timeout`) plays the part of convcache's
micro-batcher; LitServe's default batch/unbatch hand `predict` a list of uploads and split its list of answers.

    python -m convcache.benchmarks.litserve_peer MODEL PORT MAX_BATCH BATCH_TIMEOUT_S
"""

from __future__ import annotations

import sys

import litserve as ls


class FusedModelAPI(ls.LitAPI):
    def __init__(self, model: str, max_batch: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout)
        self.model = model

    def setup(self, device):
        from convcache.serve import Predictor

        self.predictor = Predictor(self.model, "cpu")

    def decode_request(self, request):
        upload = request["image"]
        return upload.file.read() if hasattr(upload, "file") else upload

    def predict(self, x):  # a batch of encoded images: decoded and inferred by the Predictor, as convcache does
        return self.predictor.predict(list(x))

    def encode_response(self, output):
        return {"predictions": [output.to_dict()]}


def main() -> None:
    model, port, max_batch, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    api = FusedModelAPI(model, max_batch, timeout)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120).run(port=port, generate_client_file=False)


if __name__ == "__main__":
    main()
