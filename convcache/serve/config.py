"""The service's configuration, importable without FastAPI (the CLI builds it before anything starts)."""

from __future__ import annotations

from dataclasses import dataclass


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
    max_decode_bytes: int = 256 << 20  # per image (see convcache.imaging)
    decode_memory_bytes: int = 1 << 30  # decodes at once: this budget // max_decode_bytes
    body_timeout_s: float = 10.0  # each chunk of a request body must arrive within this
    max_connections: int = 512  # uvicorn's limit_concurrency: more get 503 at once
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this
    header_timeout_s: float = 10.0  # request headers must be complete within this (slowloris)
    name: str | None = None  # the model's name on the Open Inference Protocol (default: the file's stem)
