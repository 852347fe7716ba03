"""One error body for every failure: `{"error": "..."}` (503s carry Retry-After)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def image_status(reason: str) -> int:
    """415 for what is not an image at all, 422 for an image that cannot be used."""
    return 415 if reason in ("not an image", "empty file") or reason.startswith("unsupported") else 422


def install_error_handlers(app: FastAPI) -> None:
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
