"""Reading an upload under the service's limits: the declared and the actual size, a per-chunk timeout,
then the multipart form (FastAPI's `UploadFile`s, parsed by python-multipart) from the bytes already read."""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import ClientDisconnect, Request

from convcache.serve.errors import HTTPError

log = logging.getLogger(__name__)


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPError(413, f"body over {max_bytes} bytes")
    chunks, size = [], 0
    stream = request.stream()
    try:
        while True:  # each chunk must arrive within the body timeout: slow or stalled bodies are cut off
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout_s)
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size > max_bytes:
                raise HTTPError(413, f"body over {max_bytes} bytes")
            chunks.append(chunk)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body stalled for over {timeout_s:g}s") from None
    except ClientDisconnect:
        log.debug("client disconnected while sending its body")
        raise HTTPError(400, "client disconnected") from None
    return b"".join(chunks)


async def read_images(request: Request, max_bytes: int, timeout_s: float, max_files: int) -> list[bytes]:
    """The image bytes of a request: a raw body is one image; a multipart form gives every file in it."""
    body = await read_body(request, max_bytes, timeout_s)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [body]
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
