"""The HTTP routes: thin handlers over the `InferenceService` in `app.state.service`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from convcache.serve.body import read_images
from convcache.serve.metrics import exposition_registry
from convcache.serve.schemas import ERRORS, IMAGE_BODY, FeaturesResponse, ModelInfo, PredictResponse
from convcache.serve.service import InferenceService

router = APIRouter()


def _service(request: Request) -> InferenceService:
    return request.app.state.service


async def _results(request: Request):
    service = _service(request)
    c = service.config
    images = await read_images(request, service.body_limits, c.max_files, service.bodies)
    return service, await service.infer_all(images)


@router.post("/v1/predict", summary="Classify one or more images (multipart upload or a raw image body)",
             response_model=PredictResponse, response_model_by_alias=True, responses=ERRORS,
             openapi_extra=IMAGE_BODY)
async def predict(request: Request):
    service, results = await _results(request)
    return {"model": service.model_id, "predictions": service.predictions(results)}


@router.post("/v1/features", summary="The extractor's feature vector of each image", response_model=FeaturesResponse,
             responses=ERRORS, openapi_extra=IMAGE_BODY)
async def features(request: Request):
    service, results = await _results(request)
    return {"model": service.model_id, "features": [
        {"features": feats.tolist(), "cached": cached} for (_, feats), cached in results]}


@router.get("/v1/model", summary="The fused model's identity, classes and provenance", response_model=ModelInfo)
async def model_info(request: Request):
    return _service(request).model_info()


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    ready = _service(request).ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text exposition format)",
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
async def prometheus(request: Request):
    registry = exposition_registry(_service(request).metrics.registry)
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
