"""Dynamic micro-batching: concurrent requests are gathered up to max_batch images or max_wait
seconds, then run as one inference call on a single inference thread."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class QueueFull(Exception):
    """More images are waiting than the queue bound allows."""


class MicroBatcher:
    def __init__(self, run_batch, max_batch: int = 32, max_wait: float = 0.005, max_queue: int = 256,
                 on_batch=None, coming=None):
        self.run_batch = run_batch  # uint8 (n, h, w, 3) -> (probabilities, features)
        # coming(): images known to be on their way (being decoded). With none coming and none queued, a batch
        # goes at once: a lone client's request never waits max_wait for company that cannot arrive
        self.coming = coming or (lambda: 1)
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        # on_batch(size, each request's queue ns, (input, inference, output) ns of the call, ok): after each call
        self.on_batch = on_batch or (lambda n, queued, compute, ok: None)
        self.queue: asyncio.Queue | None = None
        self.pending = 0
        self._task = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, pixels: np.ndarray):
        """One image's (probabilities, features); raises QueueFull instead of growing without bound."""
        if self.pending >= self.max_queue:
            raise QueueFull()
        self.pending += 1
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, future, time.perf_counter_ns()))
        try:
            return await future
        finally:
            self.pending -= 1

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if self.queue.empty() and not self.coming():
                    break
                timeout = deadline - loop.time()
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout) if timeout > 0
                                 else self.queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            batch = [(p, f, t) for p, f, t in batch if not f.cancelled()]
            if not batch:
                continue
            start = time.perf_counter_ns()
            queued = [start - t for _, _, t in batch]
            pixels = np.stack([p for p, _, _ in batch])  # the call's input: Triton's compute_input
            ready = time.perf_counter_ns()
            try:
                probs, feats = await loop.run_in_executor(self._executor, self.run_batch, pixels)
            except Exception as exc:  # hand the failure to each waiting request, keep serving
                self.on_batch(len(batch), queued, (ready - start, time.perf_counter_ns() - ready, 0), False)
                for _, f, _ in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            done = time.perf_counter_ns()
            for i, (_, f, _) in enumerate(batch):
                if not f.done():
                    f.set_result((probs[i], feats[i]))
            self.on_batch(len(batch), queued, (ready - start, done - ready, time.perf_counter_ns() - done), True)
