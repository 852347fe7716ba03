"""The HTTP service: FastAPI on uvicorn, micro-batched inference, a content-addressed cache, limits
that turn every bad input into a 4xx/503 JSON answer, and Prometheus metrics.

The pieces: `service.InferenceService` (model, cache, batcher, admission limits), `routes` (thin
handlers), `body` (reading an upload under the limits), `errors` (one error body), `metrics`
(Prometheus), `schemas` (typed answers), `docs` (/docs and /redoc, offline). `create_app` wires them."""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

from convcache.serve.config import ServeConfig
from convcache.serve.docs import install_docs
from convcache.serve.errors import install_error_handlers
from convcache.serve.metrics import AdmissionMiddleware, ObserveMiddleware
from convcache.serve.oip import router as oip_router
from convcache.serve.routes import router
from convcache.serve.service import InferenceService

CONFIG_ENV = "CONVCACHE_SERVE_CONFIG"


def create_app(config: ServeConfig) -> FastAPI:
    service = InferenceService(config)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        grpc_server = None
        if config.grpc_port:  # the same service behind gRPC (convcache.serve.grpc_service), in this event loop
            from convcache.serve import grpc_service

            grpc_server = await grpc_service.start(service, config.grpc_host, config.grpc_port)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=10)
        await service.stop()

    p = service.predictor
    app = FastAPI(title="convcache", version=p.model_id[:12], lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description=f"Image classification with a fused convcache model (model id {p.model_id}): "
                              f'classes {p.classes}. Every error answers `{{"error": "..."}}`.')
    app.state.service = service
    app.add_middleware(AdmissionMiddleware, service=service)
    app.add_middleware(ObserveMiddleware, metrics=service.metrics)  # added last: outermost, sees every answer
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(oip_router)
    install_docs(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` with several workers: the config travels in an environment variable."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))
