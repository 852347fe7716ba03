"""The HTTP service: FastAPI on uvicorn, micro-batched inference, a content-addressed cache, limits
that turn every bad input into a 4xx/503 JSON answer, and Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from convcache.errors import ImageError
from convcache.serve.batcher import MicroBatcher, QueueFull
from convcache.serve.cache import ResultCache, content_key
from convcache.serve.config import ServeConfig
from convcache.serve.predictor import Predictor

log = logging.getLogger(__name__)
CONFIG_ENV = "CONVCACHE_SERVE_CONFIG"


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="the most probable class")
    probabilities: dict[str, float] = Field(description="probability of each class")
    cached: bool = Field(description="answered from the content-addressed cache")


class PredictResponse(BaseModel):
    model: str = Field(description="the model id: the fused model's identity (see `convcache info`)")
    predictions: list[Prediction]


class FeatureVector(BaseModel):
    features: list[float]
    cached: bool


class FeaturesResponse(BaseModel):
    model: str
    features: list[FeatureVector]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")


class ModelInfo(BaseModel):
    model: str
    provider: str
    classes: list[str]
    input_size: int
    extractor: dict
    head: str | None


IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "one or more image files (any field name is accepted)"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "or one image as the raw body"},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "malformed multipart body"), (413, "body too large"), (415, "not an image"),
    (422, "corrupt image, too many pixels, or no files"), (503, "overloaded"))}


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
        self.model = Gauge("convcache_model_info", "the served model's id (its identity); always 1", ["model"],
                           registry=r, multiprocess_mode="max")


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
            route = scope.get("route")  # set by the router: label by route template, never by raw path
            endpoint = getattr(route, "path", None) or "<unmatched>"
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            if status[0] >= 400:
                self.metrics.errors.labels(str(status[0])).inc()


def create_app(config: ServeConfig) -> FastAPI:
    predictor = Predictor(config.model, config.device, config.max_batch, config.max_pixels)
    metrics = Metrics()
    metrics.model.labels(predictor.model_id).set(1)
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

    app = FastAPI(title="convcache", version=predictor.model_id[:12], lifespan=lifespan,
                  description=f"Image classification with a fused convcache model (model id "
                              f"{predictor.model_id}): classes {predictor.classes}. Every error answers "
                              '`{"error": "..."}`.')

    app.add_middleware(ObserveMiddleware, metrics=metrics)

    # one error body shape for everything: {"error": "..."}
    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    async def read_images(request: Request) -> list[bytes]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise HTTPError(413, f"body over {config.max_body_bytes} bytes")
        chunks, size = [], 0
        stream = request.stream()
        try:
            while True:  # each chunk must arrive within the body timeout: slow or stalled bodies are cut off
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), config.body_timeout_s)
                except StopAsyncIteration:
                    break
                size += len(chunk)
                if size > config.max_body_bytes:
                    raise HTTPError(413, f"body over {config.max_body_bytes} bytes")
                chunks.append(chunk)
        except asyncio.TimeoutError:
            raise HTTPError(408, f"the request body stalled for over {config.body_timeout_s:g}s") from None
        except ClientDisconnect:
            log.debug("client disconnected while sending its body")
            raise HTTPError(400, "client disconnected") from None
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

    decode_slots = asyncio.Semaphore(max(1, config.decode_memory_bytes // config.max_decode_bytes))
    decoding = {"n": 0}

    async def infer(data: bytes, index: int):
        key = content_key(data, predictor.sha256)
        hit = cache.get(key)
        if hit is not None:
            metrics.cache_hits.inc()
            return hit, True
        metrics.cache_misses.inc()
        # overload is answered before any decoding work: images waiting for inference + being decoded
        if batcher.pending + decoding["n"] >= config.max_queue:
            raise HTTPError(503, "overloaded: the inference queue is full, retry later")
        decoding["n"] += 1
        try:
            async with decode_slots:  # decodes at once are capped by a memory budget
                pixels = await run_in_threadpool(predictor.to_pixels, data)
        except ImageError as exc:
            raise HTTPError(_image_status(exc.reason), f"image {index}: {exc.reason}") from None
        finally:
            decoding["n"] -= 1
        try:
            result = await batcher.submit(pixels)
        except QueueFull:
            raise HTTPError(503, "overloaded: the inference queue is full, retry later") from None
        cache.put(key, result)
        return result, False

    async def infer_all(request: Request):
        images = await read_images(request)
        return await asyncio.gather(*(infer(d, i) for i, d in enumerate(images)))

    @app.post("/v1/predict", summary="Classify one or more images (multipart upload or a raw image body)",
              response_model=PredictResponse, response_model_by_alias=True, responses=ERRORS,
              openapi_extra=IMAGE_BODY)
    async def predict(request: Request):
        results = await infer_all(request)
        return {"model": predictor.model_id, "predictions": [
            {**predictor.to_prediction(probs).to_dict(), "cached": cached} for (probs, _), cached in results]}

    @app.post("/v1/features", summary="The extractor's feature vector of each image", response_model=FeaturesResponse,
              responses=ERRORS, openapi_extra=IMAGE_BODY)
    async def features(request: Request):
        results = await infer_all(request)
        return {"model": predictor.model_id, "features": [
            {"features": feats.tolist(), "cached": cached} for (_, feats), cached in results]}

    @app.get("/v1/model", summary="The fused model's identity, classes and provenance", response_model=ModelInfo)
    async def model_info():
        ext = predictor.metadata.get("extractor", {})
        return {"model": predictor.model_id, "provider": predictor.provider, "classes": predictor.classes,
                "input_size": predictor.size, "head": predictor.metadata.get("head"),
                "extractor": {k: ext.get(k) for k in ("sha256", "layer", "pooling", "precision")}
                | {"weights": (ext.get("weights") or {}).get("source")}}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(exposition_registry(metrics.registry)), media_type=CONTENT_TYPE_LATEST)

    return app


def exposition_registry(own: CollectorRegistry) -> CollectorRegistry:
    """With several workers (PROMETHEUS_MULTIPROC_DIR set by `convcache serve --workers N`), one
    exposition aggregated across the worker processes; otherwise this process's registry."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return own
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` with several workers: the config travels in an environment variable."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))
