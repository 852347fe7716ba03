"""The inference service behind the HTTP routes: one object holding the model, its serving loop
(`convcache.serve.loop`: cache, micro-batcher, decode budget) and the admission limits (the app keeps it in
`app.state.service`). Every transport answers through `infer` / `infer_pixels` / `predictions`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from convcache.errors import ImageError
from convcache.imaging import MemoryBudget, return_freed_memory
from convcache.serve.body import BodyBudget, BodyLimits
from convcache.serve.cache import ResultCache
from convcache.serve.config import ServeConfig
from convcache.serve.errors import HTTPError, image_status
from convcache.serve.loop import Overloaded, ServingLoop
from convcache.serve.metrics import Metrics
from convcache.serve.predictor import Predictor

log = logging.getLogger(__name__)
OVERLOADED = "overloaded: the inference queue is full, retry later"


class InferenceService:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.predictor = Predictor(config.model, config.device, config.max_batch, config.max_pixels)
        self.metrics = Metrics()
        self.metrics.model.labels(self.predictor.model_id).set(1)
        self.cache = ResultCache(config.cache_bytes)
        self.decode_memory = MemoryBudget(config.decode_memory_bytes)  # every intermediate counted
        self.loop = ServingLoop(self.predictor, self.cache, self.metrics, self.decode_memory, config.max_batch,
                                config.max_wait_ms / 1000, config.max_queue, adaptive=config.batch_wait == "adaptive")
        return_freed_memory()  # so that the budget bounds the peak RSS (see convcache.imaging)
        self.body_limits = BodyLimits(config.max_body_bytes, config.body_timeout_s, config.body_min_rate,
                                      config.body_grace_s, config.body_deadline_s)
        self.bodies = BodyBudget(config.body_memory_bytes)
        self.in_flight = 0  # requests being answered, health probes aside (AdmissionMiddleware)
        self.ready = False
        self.name = config.name or Path(config.model).stem  # the model's name on the Open Inference Protocol
        self.n_features = int(np.prod(self.predictor.contract.feature_shape))

    @property
    def model_id(self) -> str:
        return self.predictor.model_id

    async def start(self) -> None:
        await self.loop.start()
        self.ready = True
        log.info("serving %s on %s", self.config.model, self.predictor.provider)

    async def stop(self) -> None:
        self.ready = False  # uvicorn has drained in-flight requests before this point
        await self.loop.stop()

    async def infer(self, data: bytes, index: int):
        """(probabilities, features) of one encoded image and whether the cache answered."""
        try:
            return await self.loop.infer(data)
        except ImageError as exc:
            raise HTTPError(image_status(exc.reason), f"image {index}: {exc.reason}") from None
        except Overloaded:
            raise HTTPError(503, OVERLOADED) from None

    async def infer_pixels(self, pixels, index: int):
        """The same for one image already at the model's size (the Open Inference Protocol's tensors)."""
        try:
            return await self.loop.infer_pixels(pixels)
        except Overloaded:
            raise HTTPError(503, OVERLOADED) from None

    async def infer_all(self, images: list[bytes]):
        return await asyncio.gather(*(self.infer(d, i) for i, d in enumerate(images)))

    def predictions(self, results) -> list[dict]:
        """/v1's answers: each result's prediction (the postprocess hook) and whether the cache answered."""
        return [{**self.loop.postprocess(probs).to_dict(), "cached": cached} for (probs, _), cached in results]

    def model_info(self) -> dict:
        p = self.predictor
        ext = p.contract.extractor
        return {"model": p.model_id, "provider": p.provider, "classes": p.classes, "input_size": p.size,
                "head": p.contract.head or None,
                "extractor": {k: ext.get(k) for k in ("sha256", "layer", "pooling", "precision")}
                | {"weights": (ext.get("weights") or {}).get("source")}}
