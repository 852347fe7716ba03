"""The Open Inference Protocol (KServe v2, REST) beside /v1, for clients such as `tritonclient[http]`:
`GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}` (metadata), `/v2/models/{name}/ready`,
`POST /v2/models/{name}/infer` with JSON tensors or the binary tensor data extension
(`Inference-Header-Content-Length`). Inputs: `images` as FP32 or UINT8 NHWC pixels at the model's size, or as
BYTES image files (decoded as /v1 decodes them). Outputs: `probabilities` and, when asked for, `features`
(flattened, as /v1/features). The same limits, micro-batching, cache and metrics as /v1; errors answer
`{"error": "..."}`, the protocol's error shape."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from convcache.serve.body import read_body
from convcache.serve.errors import HTTPError
from convcache.serve.service import InferenceService

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
HEADER = "Inference-Header-Content-Length"
NUMPY = {"FP32": np.float32, "UINT8": np.uint8}
VERSION = "1"


def _service(request: Request) -> InferenceService:
    return request.app.state.service


def _model(request: Request, name: str) -> InferenceService:
    service = _service(request)
    if name != service.name:
        raise HTTPError(404, f"unknown model '{name}' (this server serves '{service.name}')")
    return service


@router.get("", summary="Server metadata")
async def server_metadata(request: Request):
    from convcache import __version__

    return {"name": "convcache", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness")
async def live():
    return {"live": True}


@router.get("/health/ready", summary="Readiness")
async def ready(request: Request):
    ok = _service(request).ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", summary="Model metadata: inputs and outputs")
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, name: str, version: str = VERSION):
    s = _model(request, name)
    size, k = s.predictor.size, len(s.predictor.classes)
    return {"name": name, "versions": [VERSION], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, size, size, 3]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "features", "datatype": "FP32", "shape": [-1, s.n_features]}],
            "parameters": {"classes": s.predictor.classes, "model_id": s.model_id}}


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, name: str, version: str = VERSION):
    s = _model(request, name)
    return JSONResponse({"name": name, "ready": s.ready}, status_code=200 if s.ready else 503)


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise HTTPError(400, f"{HEADER}: {header_length!r} is not a byte count") from None
        if not 0 <= n <= len(body):
            raise HTTPError(400, f"{HEADER} {n} is outside the {len(body)}-byte body")
        json_part, binary = body[:n], body[n:]
    try:
        request = json.loads(json_part)
    except ValueError as exc:
        raise HTTPError(400, f"the inference request is not JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise HTTPError(400, "the inference request needs a non-empty 'inputs' list")
    return request, binary


def _images(tensor: dict, binary: bytes, offset: int, size: int) -> tuple[list, int]:
    """One input tensor as a list of images (HxWx3 arrays, or encoded files for BYTES), and the binary
    offset after it."""
    if not isinstance(tensor, dict) or tensor.get("name") != "images":
        raise HTTPError(400, f"unknown input {tensor.get('name') if isinstance(tensor, dict) else tensor!r}: "
                             "the model takes 'images'")
    dtype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HTTPError(400, f"input 'images': shape {shape!r} is not a list of sizes")
    nbytes = (tensor.get("parameters") or {}).get("binary_data_size")
    raw = None
    if nbytes is not None:
        if not isinstance(nbytes, int) or nbytes < 0 or offset + nbytes > len(binary):
            raise HTTPError(400, f"input 'images': binary_data_size {nbytes!r} runs past the body")
        raw, offset = binary[offset : offset + nbytes], offset + nbytes
    if dtype == "BYTES":
        if raw is None:
            raise HTTPError(400, "input 'images' as BYTES: send the image files as binary data")
        files, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise HTTPError(400, "input 'images': a truncated BYTES element")
            (n,) = struct.unpack_from("<I", raw, at)
            files.append(raw[at + 4 : at + 4 + n])
            at += 4 + n
        if len(files) != int(np.prod(shape)):
            raise HTTPError(400, f"input 'images': {len(files)} BYTES elements for shape {shape}")
        return files, offset
    if dtype not in NUMPY:
        raise HTTPError(400, f"input 'images': datatype {dtype!r}; send FP32 or UINT8 pixels, or BYTES files")
    if len(shape) != 4 or shape[1:] != [size, size, 3]:
        raise HTTPError(400, f"input 'images': shape {shape}, expected [N, {size}, {size}, 3] (NHWC, RGB)")
    try:
        array = (np.frombuffer(raw, NUMPY[dtype]) if raw is not None else
                 np.asarray(tensor.get("data"), NUMPY[dtype])).reshape(shape)
    except (ValueError, TypeError) as exc:
        raise HTTPError(400, f"input 'images': data does not fill shape {shape} as {dtype} ({exc})") from None
    if dtype == "FP32" and not np.isfinite(array).all():
        raise HTTPError(400, "input 'images': pixels must be finite")
    return list(array), offset


@router.post("/models/{name}/infer", summary="Inference (JSON tensors or the binary tensor data extension)")
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, name: str, version: str = VERSION):
    s = _model(request, name)
    c = s.config
    body = await read_body(request, s.body_limits, s.bodies)
    req, binary = _split(body, request.headers.get(HEADER))
    images, offset = [], 0
    for tensor in req["inputs"]:
        got, offset = _images(tensor, binary, offset, s.predictor.size)
        images += [(img, isinstance(img, bytes)) for img in got]
    if len(images) > c.max_files * c.max_batch:
        raise HTTPError(413, f"{len(images)} images in one request; at most {c.max_files * c.max_batch}")
    results = await asyncio.gather(*(s.infer(img, i) if encoded else s.infer_pixels(img, i)
                                     for i, (img, encoded) in enumerate(images)))
    wanted = req.get("outputs") or [{"name": "probabilities"}]
    outputs, chunks = [], []
    for out in wanted:
        which = out.get("name") if isinstance(out, dict) else None
        if which not in ("probabilities", "features"):
            raise HTTPError(400, f"unknown output {which!r}: the model gives 'probabilities' and 'features'")
        value = np.stack([r[0] if which == "probabilities" else r[1] for r, _ in results]).astype(np.float32)
        entry = {"name": which, "datatype": "FP32", "shape": list(value.shape)}
        as_binary = bool((out.get("parameters") or {}).get("binary_data",
                                                           (req.get("parameters") or {}).get("binary_data_output")))
        if as_binary:
            data = value.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = value.ravel().tolist()
        outputs.append(entry)
    answer = {"model_name": name, "model_version": VERSION, "outputs": outputs,
              "parameters": {"cached": [cached for _, cached in results], "model_id": s.model_id}}
    if "id" in req:
        answer["id"] = req["id"]
    head = json.dumps(answer).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER: str(len(head))})
