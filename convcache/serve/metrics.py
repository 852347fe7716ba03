"""Prometheus metrics of the service, observed by a plain ASGI middleware, exposed once across workers."""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)


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


class AdmissionMiddleware:
    """Requests in flight are bounded by `max_connections` (503 + Retry-After past it), except health
    probes and /metrics (`PROBE_PATHS`), which stay answerable while every request slot is taken; uvicorn's
    own connection limit leaves them `HEALTH_RESERVE` connections. A request's share of the global body
    budget is released when it is answered."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        from convcache.serve.config import PROBE_PATHS

        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            return await self.app(scope, receive, send)
        s = self.service
        if s.in_flight >= s.config.max_connections:
            body = b'{"error":"busy: every request slot is taken; retry later"}'
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})
            return
        s.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            s.in_flight -= 1
            s.bodies.release(scope)


def exposition_registry(own: CollectorRegistry) -> CollectorRegistry:
    """With several workers (PROMETHEUS_MULTIPROC_DIR set by `convcache serve --workers N`), one
    exposition aggregated across the worker processes; otherwise this process's registry."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return own
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
