"""The serving loop: decode -> batch -> infer -> postprocess, the one place a model's hooks are called (as
LitServe's loop calls a LitAPI's). The hooks are `PredictorHooks` (`Predictor` implements them); two drivers
run them:

- `run_batches` / `predict`: in this process, batch by batch (`Predictor.predict`, `convcache predict`);
- `ServingLoop`: in the service, for every transport alike (`/v1` and the Open Inference Protocol): decoding in
  threads under one memory budget, the content-addressed cache, the micro-batcher (one `infer` call per batch
  of requests), the queue bound, and `postprocess` for the answers that carry predictions.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PredictorHooks(Protocol):
    """What a served model provides; the loop calls nothing else of it."""

    classes: list
    size: int
    model_id: str

    def decode(self, item, budget=None) -> np.ndarray:
        """One input (path, bytes, PIL image, array) -> uint8 size x size x 3; raises ImageError."""

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch of uint8 pixels -> (probabilities, flattened features)."""

    def postprocess(self, probabilities: np.ndarray):
        """One row of probabilities -> the answer (a `Prediction`)."""


def run_batches(hooks: PredictorHooks, items: list, batch_size: int):
    """(probabilities, features) of `items`, a batch at a time, in order."""
    for i in range(0, len(items), batch_size):
        yield hooks.infer(np.stack([hooks.decode(x) for x in items[i : i + batch_size]]))


def predict(hooks: PredictorHooks, items: list, batch_size: int) -> list:
    return [hooks.postprocess(p) for probs, _ in run_batches(hooks, items, batch_size) for p in probs]


def features(hooks: PredictorHooks, items: list, batch_size: int) -> np.ndarray:
    return np.concatenate([feats for _, feats in run_batches(hooks, items, batch_size)])


class Overloaded(Exception):
    """The queue bound is reached: the request is refused before any work."""


class ServingLoop:
    """The hooks behind the service: `infer` (encoded images) and `infer_pixels` (tensors at the model's
    size) answer (probabilities, features) and whether the cache answered; `postprocess` makes predictions.
    Decodes at once share `decode_memory` (an `imaging.MemoryBudget`); requests waiting for inference and
    being decoded count against `max_queue`."""

    def __init__(self, hooks: PredictorHooks, cache, metrics, decode_memory, max_batch: int, max_wait_s: float,
                 max_queue: int, adaptive: bool = True):
        from convcache.serve.batcher import MicroBatcher

        self.hooks, self.cache, self.metrics, self.decode_memory = hooks, cache, metrics, decode_memory
        self.max_queue = max_queue
        self.batcher = MicroBatcher(hooks.infer, max_batch, max_wait_s, max_queue, on_batch=metrics.on_batch,
                                    coming=(lambda: self.decoding) if adaptive else None)
        self.decoding = 0  # images being decoded now (they count against the queue bound)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def infer(self, data: bytes):
        """(probabilities, features) of one encoded image, and whether the cache answered. ImageError for an
        image that does not decode; Overloaded when the queue is full."""
        from starlette.concurrency import run_in_threadpool

        from convcache.serve.cache import content_key

        async def decode():
            self.decoding += 1
            try:  # decodes at once are held under a memory budget (a decode thread waits for room)
                return await run_in_threadpool(self.hooks.decode, data, self.decode_memory)
            finally:
                self.decoding -= 1

        return await self._cached(content_key(data, self.hooks.model_id), decode)

    async def infer_pixels(self, pixels: np.ndarray):
        """The same for one image already at the model's size (HxWx3, uint8 or float32 0-255): the Open
        Inference Protocol's tensor input. Cached by the pixels' bytes and dtype."""
        from convcache.serve.cache import content_key

        async def ready():
            return pixels

        return await self._cached(content_key(str(pixels.dtype).encode() + pixels.tobytes(), self.hooks.model_id),
                                  ready)

    async def _cached(self, key: str, pixels):
        from convcache.serve.batcher import QueueFull

        start = time.perf_counter_ns()
        hit = self.cache.get(key)
        if hit is not None:
            self.metrics.cache_hits.inc()
            self.metrics.stats.request(time.perf_counter_ns() - start, True, cached=True)
            return hit, True
        self.metrics.cache_misses.inc()
        ok = False
        try:
            # overload is answered before any decoding work: images waiting for inference + being decoded
            if self.batcher.pending + self.decoding >= self.max_queue:
                raise Overloaded
            try:
                result = await self.batcher.submit(await pixels())
            except QueueFull:
                raise Overloaded from None
            ok = True
        finally:
            self.metrics.stats.request(time.perf_counter_ns() - start, ok, cached=False if ok else None)
        self.cache.put(key, result)
        return result, False

    def postprocess(self, probabilities: np.ndarray):
        return self.hooks.postprocess(probabilities)

