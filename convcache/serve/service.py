"""The inference service behind the HTTP routes: one object holding the model, the content-addressed
cache, the micro-batcher and the admission limits (the app keeps it in `app.state.service`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool

from convcache.errors import ImageError
from convcache.imaging import MemoryBudget, return_freed_memory
from convcache.serve.batcher import MicroBatcher, QueueFull
from convcache.serve.body import BodyBudget, BodyLimits
from convcache.serve.cache import ResultCache, content_key
from convcache.serve.config import ServeConfig
from convcache.serve.errors import HTTPError, image_status
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
        self.cache = ResultCache(config.cache_size)
        self.batcher = MicroBatcher(self.predictor.run_pixels, config.max_batch, config.max_wait_ms / 1000,
                                    config.max_queue, on_batch=self.metrics.batch_size.observe)
        self.decode_memory = MemoryBudget(config.decode_memory_bytes)  # every intermediate counted
        return_freed_memory()  # so that the budget bounds the peak RSS (see convcache.imaging)
        self.body_limits = BodyLimits(config.max_body_bytes, config.body_timeout_s, config.body_min_rate,
                                      config.body_grace_s, config.body_deadline_s)
        self.bodies = BodyBudget(config.body_memory_bytes)
        self.in_flight = 0  # requests being answered, health probes aside (AdmissionMiddleware)
        self.decoding = 0  # images being decoded now (they count against the queue bound)
        self.ready = False
        self.name = config.name or Path(config.model).stem  # the model's name on the Open Inference Protocol
        self.n_features = int(np.prod(self.predictor.contract.feature_shape))

    @property
    def model_id(self) -> str:
        return self.predictor.model_id

    async def start(self) -> None:
        await self.batcher.start()
        self.ready = True
        log.info("serving %s on %s", self.config.model, self.predictor.provider)

    async def stop(self) -> None:
        self.ready = False  # uvicorn has drained in-flight requests before this point
        await self.batcher.stop()

    async def infer(self, data: bytes, index: int):
        """(probabilities, features) of one encoded image and whether the cache answered."""

        async def decode():
            self.decoding += 1
            try:  # decodes at once are held under a memory budget (a decode thread waits for room)
                return await run_in_threadpool(self.predictor.to_pixels, data, self.decode_memory)
            except ImageError as exc:
                raise HTTPError(image_status(exc.reason), f"image {index}: {exc.reason}") from None
            finally:
                self.decoding -= 1

        return await self._cached(content_key(data, self.predictor.sha256), decode)

    async def infer_pixels(self, pixels, index: int):
        """The same for one image already at the model's size (HxWx3, uint8 or float32 0-255): the Open
        Inference Protocol's tensor input. Cached by the pixels' bytes and dtype."""
        async def ready():
            return pixels

        key = content_key(str(pixels.dtype).encode() + pixels.tobytes(), self.predictor.sha256)
        return await self._cached(key, ready)

    async def _cached(self, key: str, pixels):
        hit = self.cache.get(key)
        if hit is not None:
            self.metrics.cache_hits.inc()
            return hit, True
        self.metrics.cache_misses.inc()
        # overload is answered before any decoding work: images waiting for inference + being decoded
        if self.batcher.pending + self.decoding >= self.config.max_queue:
            raise HTTPError(503, OVERLOADED)
        try:
            result = await self.batcher.submit(await pixels())
        except QueueFull:
            raise HTTPError(503, OVERLOADED) from None
        self.cache.put(key, result)
        return result, False

    async def infer_all(self, images: list[bytes]):
        return await asyncio.gather(*(self.infer(d, i) for i, d in enumerate(images)))

    def model_info(self) -> dict:
        p = self.predictor
        ext = p.contract.extractor
        return {"model": p.model_id, "provider": p.provider, "classes": p.classes, "input_size": p.size,
                "head": p.contract.head or None,
                "extractor": {k: ext.get(k) for k in ("sha256", "layer", "pooling", "precision")}
                | {"weights": (ext.get("weights") or {}).get("source")}}
