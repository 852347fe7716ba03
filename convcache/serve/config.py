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
