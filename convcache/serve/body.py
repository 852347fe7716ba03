"""Reading an upload under the service's limits, then the multipart form (FastAPI's `UploadFile`s, parsed
by python-multipart) from the bytes already read.

A body is refused when it declares or grows past `max_body_bytes` (413); when one chunk takes over
`body_timeout_s`, or, after a grace period, it arrives slower than a minimum data rate, or the whole body
is not in within a deadline (408: Kestrel's `MinRequestBodyDataRate`, 240 B/s after 5 s, plus a
deadline); and when the bytes that every request's body holds at once would pass the service's global
body budget (503 + Retry-After: `BodyBudget`). A slow-body attacker must then send at the minimum rate on
every connection, and cannot hold one past the deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from convcache.serve.errors import HTTPError

log = logging.getLogger(__name__)
HELD = "convcache.body_bytes"  # the scope key of the bytes a request holds against the budget


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    chunk_timeout_s: float = 10.0
    min_rate: float = 240.0  # bytes/s, checked once the grace period is over
    grace_s: float = 5.0
    deadline_s: float = 60.0


class BodyBudget:
    """The bytes held by all request bodies at once (one event loop: no lock needed). A request's share is
    released when its response is sent (`AdmissionMiddleware`), since its bytes live until then."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, scope, n: int) -> None:
        if n <= 0:
            return
        if self.held + n > self.limit:
            raise HTTPError(503, f"busy: request bodies in flight hold over {self.limit >> 20} MiB; retry later")
        self.held += n
        scope[HELD] = scope.get(HELD, 0) + n

    def release(self, scope) -> None:
        self.held -= scope.pop(HELD, 0)

    @asynccontextmanager
    async def holding(self, n: int):
        """Hold `n` more bytes for the block (what parsing a body takes besides the body): 503 past the limit."""
        if self.held + n > self.limit:
            raise HTTPError(503, f"busy: request bodies in flight hold over {self.limit >> 20} MiB; retry later")
        self.held += n
        try:
            yield
        finally:
            self.held -= n


async def read_body(request: Request, limits: BodyLimits, budget: BodyBudget | None = None) -> bytes:
    max_bytes = limits.max_bytes
    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise HTTPError(413, f"body over {max_bytes} bytes")
    if budget is not None and declared:
        budget.take(request.scope, declared)  # refused before a byte is read
    chunks, size = [], 0
    stream = request.stream()
    start = last = time.monotonic()
    pending = None  # the next chunk, awaited without cancelling the stream when a check wakes up first
    try:
        while True:
            now = time.monotonic()
            elapsed = now - start
            if elapsed > limits.grace_s and size < limits.min_rate * elapsed:
                raise HTTPError(408, f"the request body arrived slower than {limits.min_rate:g} B/s")
            if elapsed >= limits.deadline_s:
                raise HTTPError(408, f"the request body was not complete within {limits.deadline_s:g}s")
            if now - last >= limits.chunk_timeout_s:
                raise HTTPError(408, f"the request body stalled for over {limits.chunk_timeout_s:g}s")
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            rate_check = max(limits.grace_s, size / limits.min_rate) - elapsed if limits.min_rate > 0 else 1e9
            wait = min(limits.chunk_timeout_s - (now - last), limits.deadline_s - elapsed, rate_check)
            done, _ = await asyncio.wait({pending}, timeout=max(wait, 0) + 0.01)
            if not done:
                continue  # the checks at the top decide
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                pending = None
                break
            pending, last = None, time.monotonic()
            size += len(chunk)
            if size > max_bytes:
                raise HTTPError(413, f"body over {max_bytes} bytes")
            if budget is not None and size > (declared or 0):
                budget.take(request.scope, size - max(declared or 0, size - len(chunk)))
            chunks.append(chunk)
    except ClientDisconnect:
        log.debug("client disconnected while sending its body")
        raise HTTPError(400, "client disconnected") from None
    finally:
        if pending is not None:
            pending.cancel()
    return b"".join(chunks)


async def read_images(request: Request, limits: BodyLimits, max_files: int, budget: BodyBudget | None = None
                      ) -> list[bytes]:
    """The image bytes of a request: a raw body is one image; a multipart form gives every file in it."""
    body = await read_body(request, limits, budget)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [body]
    if budget is not None:  # the form's files are a second copy of the body's bytes
        budget.take(request.scope, len(body))
    sent = False

    async def replay():  # the body was read once, under the limits: the form parser reads it from here
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files)
    except Exception as exc:
        raise HTTPError(400, f"malformed multipart body: {exc}") from None
    files = [v for _, v in form.multi_items() if hasattr(v, "read")]
    if not files:
        raise HTTPError(422, "the multipart upload holds no files")
    try:
        return [await f.read() for f in files]
    finally:
        await form.close()
