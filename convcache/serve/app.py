"""The HTTP service: FastAPI on uvicorn, micro-batched inference, a content-addressed cache, limits
that turn every bad input into a 4xx/503 JSON answer, and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from convcache.errors import ImageError
from convcache.serve.batcher import MicroBatcher, QueueFull
from convcache.serve.cache import ResultCache, content_key
from convcache.serve.predictor import Predictor

log = logging.getLogger(__name__)
CONFIG_ENV = "CONVCACHE_SERVE_CONFIG"


@dataclass
class ServeConfig:
    model: str
    device: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    cache_size: int = 10_000
    max_body_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    max_files: int = 64


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _image_status(reason: str) -> int:
    return 415 if reason in ("not an image", "empty file") or reason.startswith("unsupported") else 422


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("convcache_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("convcache_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("convcache_batch_size", "images per inference call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.cache_hits = Counter("convcache_cache_hits", "answers served from the cache", registry=r)
        self.cache_misses = Counter("convcache_cache_misses", "answers computed", registry=r)
        self.errors = Counter("convcache_errors", "requests answered with an error", ["status"], registry=r)


class ObserveMiddleware:
    """Latency, status and error metrics as plain ASGI (Starlette's @app.middleware costs ~1 ms a request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:  # Starlette has already answered 500; never let it take the process down
            log.exception("unhandled error on %s", scope["path"])
        finally:
            endpoint = scope["path"]
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            if status[0] >= 400:
                self.metrics.errors.labels(str(status[0])).inc()


def create_app(config: ServeConfig) -> FastAPI:
    predictor = Predictor(config.model, config.device, config.max_batch, config.max_pixels)
    metrics = Metrics()
    cache = ResultCache(config.cache_size)
    batcher = MicroBatcher(predictor.run_pixels, config.max_batch, config.max_wait_ms / 1000, config.max_queue,
                           on_batch=metrics.batch_size.observe)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        state["ready"] = True
        log.info("serving %s on %s", config.model, predictor.provider)
        yield
        state["ready"] = False  # uvicorn has drained in-flight requests before this point
        await batcher.stop()

    app = FastAPI(title="convcache", version=predictor.metadata.get("graph_sha256", "")[:12], lifespan=lifespan,
                  description=f"Image classification with a fused convcache model: classes {predictor.classes}.")

    app.add_middleware(ObserveMiddleware, metrics=metrics)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def read_images(request: Request) -> list[bytes]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise HTTPError(413, f"body over {config.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise HTTPError(413, f"body over {config.max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return [body]
        request._body = body  # let Starlette parse the body we already read under the limit
        try:
            form = await request.form(max_files=config.max_files)
        except Exception as exc:
            raise HTTPError(400, f"malformed multipart body: {exc}") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise HTTPError(422, "the multipart upload holds no files")
        return [await f.read() for f in files]

    async def infer(data: bytes, index: int):
        key = content_key(data, predictor.sha256)
        hit = cache.get(key)
        if hit is not None:
            metrics.cache_hits.inc()
            return hit, True
        metrics.cache_misses.inc()
        try:
            pixels = await run_in_threadpool(predictor.to_pixels, data)
        except ImageError as exc:
            raise HTTPError(_image_status(exc.reason), f"image {index}: {exc.reason}") from None
        try:
            result = await batcher.submit(pixels)
        except QueueFull:
            raise HTTPError(503, "overloaded: the inference queue is full, retry later") from None
        cache.put(key, result)
        return result, False

    async def infer_all(request: Request):
        import asyncio

        images = await read_images(request)
        return await asyncio.gather(*(infer(d, i) for i, d in enumerate(images)))

    @app.post("/v1/predict", summary="Classify one or more images (multipart upload or a raw image body)")
    async def predict(request: Request):
        results = await infer_all(request)
        return {"model": predictor.sha256, "predictions": [
            {**predictor.to_prediction(probs).to_dict(), "cached": cached} for (probs, _), cached in results]}

    @app.post("/v1/features", summary="The extractor's feature vector of each image")
    async def features(request: Request):
        results = await infer_all(request)
        return {"model": predictor.sha256, "features": [
            {"features": feats.tolist(), "cached": cached} for (_, feats), cached in results]}

    @app.get("/v1/model", summary="The fused model's metadata")
    async def model_info():
        return {"sha256": predictor.sha256, "provider": predictor.provider, "classes": predictor.classes,
                "metadata": predictor.metadata, "config": asdict(config)}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` with several workers: the config travels in an environment variable."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))
