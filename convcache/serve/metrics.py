"""Prometheus metrics of the service, observed by a plain ASGI middleware, exposed once across workers."""

from __future__ import annotations

import json
import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)


BUSY = "busy: every request slot is taken; retry later"  # every transport's answer past max_connections
SECONDS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class Metrics:
    """Prometheus metrics (request count and latency by route template, method and status; the queue wait and
    the inference call as separate histograms; images per call; cache; the process's own collectors) and the
    same phases as Triton's statistics extension counts them (`stats`)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("convcache_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("convcache_request_seconds", "request latency, from the first byte of the request "
                                 "to the end of the answer", ["endpoint", "method"], registry=r, buckets=SECONDS)
        self.queue = Histogram("convcache_queue_seconds", "time an image waited for its inference call (the "
                               "micro-batcher's gathering included)", registry=r, buckets=SECONDS)
        self.compute = Histogram("convcache_compute_seconds", "duration of one inference call (one batch)",
                                 registry=r, buckets=SECONDS)
        self.batch_size = Histogram("convcache_batch_size", "images per inference call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.stats = InferenceStats()
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # with several workers these would be one worker's
            from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(collector)
        self.cache_hits = Counter("convcache_cache_hits", "answers served from the cache", registry=r)
        self.cache_misses = Counter("convcache_cache_misses", "answers computed", registry=r)
        self.errors = Counter("convcache_errors", "requests answered with an error", ["status"], registry=r)
        self.model = Gauge("convcache_model_info", "the served model's id (its identity); always 1", ["model"],
                           registry=r, multiprocess_mode="max")


    def on_batch(self, size: int, queued_ns: list[int], phases_ns: tuple[int, int, int], ok: bool) -> None:
        """The micro-batcher's report after each inference call: each image's wait, and the call's input
        (stacking the batch), inference and output (handing each answer back) nanoseconds."""
        self.batch_size.observe(size)
        self.compute.observe(phases_ns[1] / 1e9)
        for q in queued_ns:
            self.queue.observe(q / 1e9)
        self.stats.batch(size, queued_ns, phases_ns, ok)


class InferenceStats:
    """Counts and cumulative nanoseconds per phase, as Triton's statistics extension reports them
    (`GET /v2/models/{m}/stats`): `success`/`fail` (whole requests through the serving loop), `queue` (an
    image's wait for its call), `compute_input`/`compute_infer`/`compute_output` (stacking the batch, the
    inference call, handing the answers back; counted once per image the call served, as Triton counts per
    request), `cache_hit`/`cache_miss`; `execution_count` counts calls, `inference_count` images. This
    process's counts (with several workers, the worker that answers)."""

    PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
              "cache_miss")

    def __init__(self):
        self.phases = {p: [0, 0] for p in self.PHASES}
        self.by_batch: dict[int, list[int]] = {}
        self.inference_count = self.execution_count = self.last_inference_ms = 0

    def _add(self, phase: str, ns: int, count: int = 1) -> None:
        self.phases[phase][0] += count
        self.phases[phase][1] += ns

    def batch(self, size: int, queued_ns: list[int], phases_ns: tuple[int, int, int], ok: bool) -> None:
        if not ok:
            return
        self.execution_count += 1
        self.inference_count += size
        self.last_inference_ms = int(time.time() * 1000)
        for q in queued_ns:
            self._add("queue", q)
        b = self.by_batch.setdefault(size, [0, 0, 0, 0])
        b[0] += 1
        for i, (phase, ns) in enumerate(zip(("compute_input", "compute_infer", "compute_output"), phases_ns)):
            self._add(phase, ns * size, size)  # as Triton: per request, each request charged the whole call
            b[i + 1] += ns

    def request(self, ns: int, ok: bool, cached: bool | None = None) -> None:
        self._add("success" if ok else "fail", ns)
        if cached is not None:
            self._add("cache_hit" if cached else "cache_miss", ns)

    def report(self, name: str, version: str) -> dict:
        duration = {p: {"count": c, "ns": ns} for p, (c, ns) in self.phases.items()}
        return {"name": name, "version": version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": duration,
                "batch_stats": [{"batch_size": n, "compute_input": {"count": c, "ns": i},
                                 "compute_infer": {"count": c, "ns": f}, "compute_output": {"count": c, "ns": o}}
                                for n, (c, i, f, o) in sorted(self.by_batch.items())],
                "memory_usage": []}


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
            method = scope.get("method", "") if route is not None else "<other>"  # raw methods are unbounded
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, method, str(status[0])).inc()
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
            body = json.dumps({"error": BUSY}).encode()
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
