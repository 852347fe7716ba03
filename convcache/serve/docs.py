"""/docs (Swagger UI), /redoc (ReDoc) and /openapi.json, served with their assets from an installed package
(fastapi-offline) instead of a CDN: the pages render on an air-gapped host. Each is a route of its own,
so each gets its own metric label."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def install_docs(app: FastAPI) -> None:
    """Call with an app created with docs_url, redoc_url and openapi_url set to None."""
    import fastapi_offline

    app.mount(ASSETS, StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"), name="docs-assets")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return JSONResponse(document(app))

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{ASSETS}/favicon.png",
                              with_google_fonts=False)


def document(app: FastAPI) -> dict:
    """The OpenAPI document as the service really answers: the Open Inference Protocol's request model in the
    components (its body is read raw, for the binary extension), and every 422 with the service's one error
    body (`{"error": ...}`), not FastAPI's default validation-error shape, which this service never sends."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from convcache.serve.oip import EXTRA_SCHEMAS

    spec = app.openapi()
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in EXTRA_SCHEMAS:
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(definition.pop("$defs", {}))
        schemas[model.__name__] = definition
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422")
            if answer is not None:
                answer["content"] = {"application/json": {"schema": error}}
                answer["description"] = answer.get("description", "").replace("Validation Error", "invalid request")
    for unused in ("HTTPValidationError", "ValidationError"):  # only the 422s above referred to them
        schemas.pop(unused, None)
    app.openapi_schema = spec
    return spec
