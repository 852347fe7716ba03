"""The service's configuration, importable without FastAPI (the CLI builds it before anything starts)."""

from __future__ import annotations

from dataclasses import dataclass

HEALTH_RESERVE = 64  # connections beyond max_connections that only health probes and /metrics may use
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


@dataclass
class ServeConfig:
    model: str
    device: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    # "adaptive": a batch waits up to max_wait_ms only while more images are on their way (being decoded or
    # queued); "fixed": always, as Triton's max_queue_delay (a lone client then pays max_wait_ms a request)
    batch_wait: str = "adaptive"
    max_queue: int = 256
    cache_bytes: int = 256 << 20  # cached answers, by the bytes they hold (0 disables the cache)
    max_body_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    max_files: int = 64
    max_decode_bytes: int = 256 << 20  # per image (see convcache.imaging)
    decode_memory_bytes: int = 1 << 30  # all decodes at once, every intermediate counted (imaging.MemoryBudget)
    body_timeout_s: float = 10.0  # each chunk of a request body must arrive within this
    body_min_rate: float = 240.0  # bytes/s a body must average once body_grace_s is over (408 below)
    body_grace_s: float = 5.0
    body_deadline_s: float = 60.0  # a whole body must be in within this (408)
    body_memory_bytes: int = 512 << 20  # bytes all request bodies hold at once (503 + Retry-After past it)
    max_connections: int = 512  # requests in flight (503 past it); health probes have HEALTH_RESERVE more
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this
    header_timeout_s: float = 10.0  # request headers must be complete within this (slowloris)
    max_header_bytes: int = 32 << 10  # request line + headers (431 past it; nginx: 4 x 8 KiB, h11: 16 KiB)
    max_header_fields: int = 100  # header lines (431 past it; Apache's LimitRequestFields)
    name: str | None = None  # the model's name on the Open Inference Protocol (default: the file's stem)
    grpc_port: int = 0  # KServe's v2 GRPCInferenceService on this port as well (0: none)
    grpc_host: str = "127.0.0.1"

    def __post_init__(self):
        """Limits that would refuse every request (or none) are refused at start-up, in one line."""
        from convcache.errors import ConvcacheError

        at_least_one = ("max_batch", "max_queue", "max_body_bytes", "max_pixels", "max_files", "max_decode_bytes",
                        "decode_memory_bytes", "body_memory_bytes", "max_connections", "max_header_bytes",
                        "max_header_fields")
        positive = ("body_timeout_s", "body_deadline_s", "keep_alive_s", "header_timeout_s")
        not_negative = ("cache_bytes", "max_wait_ms", "body_min_rate", "body_grace_s")
        for name in at_least_one:
            if not _number(getattr(self, name)) or getattr(self, name) < 1:
                raise ConvcacheError(f"--{_flag(name)} {getattr(self, name)}: must be at least 1")
        for name in positive:
            if not _number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ConvcacheError(f"--{_flag(name)} {getattr(self, name)}: must be > 0")
        for name in not_negative:
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConvcacheError(f"--{_flag(name)} {getattr(self, name)}: must be >= 0")
        if self.batch_wait not in ("adaptive", "fixed"):
            raise ConvcacheError(f"--batch-wait {self.batch_wait!r}: adaptive or fixed")


def _number(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _flag(name: str) -> str:
    """The option a ServeConfig field comes from (`serve --help`)."""
    return {"max_body_bytes": "max-body-mb", "cache_bytes": "cache-mb", "body_timeout_s": "body-timeout",
            "body_deadline_s": "body-deadline", "keep_alive_s": "keep-alive",
            "header_timeout_s": "header-timeout"}.get(name, name.replace("_", "-"))
