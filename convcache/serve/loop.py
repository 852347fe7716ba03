"""The serving loop: decode -> batch -> infer -> postprocess, the one place a model's hooks are called (as
LitServe's loop calls a LitAPI's). The hooks are `PredictorHooks` (`Predictor` implements them); two drivers
run them:

- `run_batches` / `predict`: in this process, batch by batch (`Predictor.predict`);
- `stream`: in this process, over many inputs, decoding in threads ahead of inference, each input's answer or
  its own error, in order (`Predictor.predict_each`, `convcache predict`);
- `ServingLoop`: in the service, for every transport alike (`/v1` and the Open Inference Protocol): decoding in
  threads under one memory budget, the content-addressed cache, the micro-batcher (one `infer` call per batch
  of requests), the queue bound, and `postprocess` for the answers that carry predictions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
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


def stream(hooks: PredictorHooks, items: Iterable, batch_size: int, workers: int | None = None, budget=None):
    """(item, probabilities or its ImageError) for every item, in the items' order, for a run over many inputs
    (`convcache predict` over a folder, `Predictor.predict_each`). `workers` threads decode ahead of inference
    (the decoders release the GIL; default: the cores this process may use), at most two batches ahead, their
    memory held by `budget` (an `imaging.MemoryBudget`); each `infer` call takes up to `batch_size` decoded
    images. An item that does not decode gives its ImageError and spoils no other. Items are taken as they come
    (paths on a pipe): a batch is the first item not yet answered and those decoded behind it, so a lone item is
    answered once it is decoded, without waiting for company. An error from the items themselves (a folder that
    cannot be read) is raised after every item before it is answered."""
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor, wait

    from convcache.errors import ImageError
    from convcache.runtime import available_cores

    workers = workers or available_cores()
    room = threading.Semaphore(2 * batch_size + workers)  # items decoding or decoded, not yet answered
    order: queue.Queue = queue.Queue()  # (item, its decode) in the items' order; then (_END, error or None)
    stop = threading.Event()

    def decode(item):
        try:
            return hooks.decode(item, budget)
        except ImageError as exc:
            return exc

    def feed(pool):
        try:
            for item in items:
                while not room.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                order.put((item, pool.submit(decode, item)))
        except Exception as exc:  # the items themselves: a folder that cannot be walked, standard input
            order.put((_END, exc))
        else:
            order.put((_END, None))

    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        feeder = threading.Thread(target=feed, args=(pool,), name="items", daemon=True)
        feeder.start()
        end = None
        try:
            while end is None:
                item, job = order.get()
                if item is _END:
                    end = (job,)
                    break
                batch = [(item, job)]
                wait([job])  # the first not yet answered; those decoded behind it meanwhile join its batch
                while len(batch) < batch_size:
                    try:
                        item, job = order.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        end = (job,)
                        break
                    batch.append((item, job))
                got = [job.result() for _, job in batch]  # (a decoder's own failure, not the image's, is raised)
                good = [g for g in got if not isinstance(g, ImageError)]
                probs = iter(hooks.infer(np.stack(good))[0] if good else ())
                for (item, _), g in zip(batch, got):
                    room.release()
                    yield item, g if isinstance(g, ImageError) else next(probs)
            if end[0] is not None:
                raise end[0]
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


_END = object()


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

