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
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from convcache.serve.body import read_body
from convcache.serve.errors import HTTPError
from convcache.serve.schemas import ErrorResponse
from convcache.serve.service import InferenceService

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
HEADER = "Inference-Header-Content-Length"
NUMPY = {"FP32": np.float32, "UINT8": np.uint8}
VERSION = "1"
PARSE_FACTOR = 8  # memory a JSON body may take while it is parsed, held against the body budget (x its size)


def _service(request: Request) -> InferenceService:
    return request.app.state.service


def _model(request: Request, name: str, version: str = "1") -> InferenceService:
    service = _service(request)
    if name != service.name:
        raise HTTPError(404, f"unknown model '{name}' (this server serves '{service.name}')")
    if version != VERSION:
        raise HTTPError(404, f"model '{name}' has no version {version!r} (it has version {VERSION})")
    return service


class Tensor(BaseModel):
    """One input tensor of the v2 data model (KServe's `RequestInput`). `data` is checked separately, against
    `shape` and `datatype`, without a copy (it can be millions of numbers)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=8)
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                      "FP32", "FP64", "BYTES"]
    parameters: dict[str, Any] | None = None


class Output(BaseModel):
    """A requested output (KServe's `RequestOutput`)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """The inference request (KServe's `InferenceRequest`), `inputs[].data` aside."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[Tensor] = Field(min_length=1, max_length=16)
    outputs: list[Output] | None = Field(default=None, max_length=4)


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | list[str] | None = None  # FP32 values, or BYTES (the classification extension's)
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    """The inference response (KServe's `InferenceResponse`): `parameters` carries `cached` per image and the
    model id."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[OutputTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """KServe's `MetadataModelResponse`."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class Duration(BaseModel):
    count: int
    ns: int


class BatchStats(BaseModel):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class InferStats(BaseModel):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration


class ModelStats(BaseModel):
    """One model's entry in Triton's statistics extension."""

    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStats
    batch_stats: list[BatchStats]
    memory_usage: list[dict[str, Any]]


class StatsResponse(BaseModel):
    model_stats: list[ModelStats]


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str


class TensorWithData(Tensor):
    """A request input with its data, as documented (the server checks `data` against `shape` and `datatype`
    itself): a flat or nested list of numbers, or absent when the tensor travels as binary data."""

    data: list[Any] | None = None


class InferRequestDoc(InferRequest):
    inputs: list[TensorWithData] = Field(min_length=1, max_length=16)


ERROR = {"model": ErrorResponse}
NOT_FOUND = {404: {**ERROR, "description": "unknown model or version"}}
INFER_ERRORS = {200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                      "description": f"JSON; with binary outputs, the JSON answer then the tensors' bytes ({HEADER})"},
                **NOT_FOUND, 400: {**ERROR, "description": "a malformed request or tensor"},
                413: {**ERROR, "description": "body too large, or too many images"},
                415: {**ERROR, "description": "a BYTES element that is not an image"},
                422: {**ERROR, "description": "a BYTES image that cannot be used"},
                503: {**ERROR, "description": "overloaded"}}
NOT_READY = {503: {"description": "not ready"}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequestDoc"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "the binary tensor data extension: the JSON request, then the "
                                                f"tensors' bytes; {HEADER} gives the JSON's length"}}}}
EXTRA_SCHEMAS = (InferRequestDoc,)  # put into the document's components by `convcache.serve.docs`


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request):
    from convcache import __version__

    return {"name": "convcache", "version": __version__,
            "extensions": ["binary_tensor_data", "classification", "model_configuration", "statistics"]}


@router.get("/health/live", summary="Liveness", response_model=Live)
async def live():
    return {"live": True}


@router.get("/health/ready", summary="Readiness", response_model=Ready, responses=NOT_READY)
async def ready(request: Request):
    ok = _service(request).ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/stats", summary="Triton's statistics extension: every model's counts and cumulative ns",
            response_model=StatsResponse)
async def all_stats(request: Request):
    s = _service(request)
    return {"model_stats": [s.metrics.stats.report(s.name, VERSION)]}


@router.get("/models/{name}", summary="Model metadata: inputs and outputs", response_model=ModelMetadata,
            responses=NOT_FOUND)
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, name: str, version: str = VERSION):
    return metadata(_model(request, name, version), name)


def metadata(s: InferenceService, name: str) -> dict:
    """The model's metadata (inputs, outputs), for either transport."""
    size, k = s.predictor.size, len(s.predictor.classes)
    return {"name": name, "versions": [VERSION], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, size, size, 3]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                        {"name": "features", "datatype": "FP32", "shape": [-1, s.n_features]}],
            "parameters": {"classes": s.predictor.classes, "model_id": s.model_id}}


@router.get("/models/{name}/config", summary="Triton's model configuration extension: the served model's "
            "configuration (the one `convcache triton` writes, with this server's batching)",
            response_model=dict[str, Any], responses=NOT_FOUND)
@router.get("/models/{name}/versions/{version}/config", include_in_schema=False)
async def model_config(request: Request, name: str, version: str = VERSION):
    return served_config(_model(request, name, version), name)


def served_config(s: InferenceService, name: str) -> dict:
    """Triton's model configuration of the served model (what `convcache triton` writes, with this server's
    batching), for either transport."""
    from convcache.serve.triton import config_dict

    c = s.config
    gpu = "CUDA" in s.predictor.provider
    return config_dict(c.model, name, max_batch=c.max_batch, preferred=(c.max_batch,),
                       delay_us=int(c.max_wait_ms * 1000), devices=("gpu",) if gpu else ("cpu",))


@router.get("/models/{name}/stats", summary="Triton's statistics extension: the model's counts and cumulative "
            "ns per phase (success, fail, queue, compute_infer, cache_hit, cache_miss) and per batch size",
            response_model=StatsResponse, responses=NOT_FOUND)
@router.get("/models/{name}/versions/{version}/stats", include_in_schema=False)
async def model_stats(request: Request, name: str, version: str = VERSION):
    s = _model(request, name, version)
    return {"model_stats": [s.metrics.stats.report(name, VERSION)]}


@router.post("/repository/index", summary="Triton's model repository extension, its index: the served model",
             response_model=list[IndexEntry])
async def repository_index(request: Request):
    s = _service(request)
    return [{"name": s.name, "version": VERSION, "state": "READY" if s.ready else "UNAVAILABLE"}]


@router.get("/models/{name}/ready", summary="Model readiness", response_model=ModelReady,
            responses={**NOT_FOUND, **NOT_READY})
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, name: str, version: str = VERSION):
    s = _model(request, name, version)
    return JSONResponse({"name": name, "ready": s.ready}, status_code=200 if s.ready else 503)


MAX_JSON_DEPTH = 64  # a v2 request nests 5 deep; 100,000-deep JSON is refused before the parser recurses


def _depth_ok(text: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Brackets nest at most `limit` deep outside strings (a scan, so the parser never recurses deeper)."""
    depth, in_string, escaped = 0, False, False
    opens = text.count(b"[") + text.count(b"{")
    if opens <= limit:
        return True
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:
                in_string = False
        elif ch == 0x22:
            in_string = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return True


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list, bytes]:
    """The JSON part, typed (`InferRequest`), each input's `data` (unvalidated), and the binary part. Runs off
    the event loop (a 20 MB JSON tensor takes a second to parse): every refusal is an HTTPError(400)."""
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
    if not _depth_ok(json_part):
        raise HTTPError(400, f"the inference request nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        raw = json.loads(json_part)
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, f"the inference request is not JSON ({str(exc)[:200]})") from None
    if not isinstance(raw, dict):
        raise HTTPError(400, "the inference request must be a JSON object")
    inputs = raw.get("inputs")
    data = [t.pop("data", None) if isinstance(t, dict) else None for t in inputs] if isinstance(inputs, list) else []
    try:
        req = InferRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise HTTPError(400, f"the inference request: {where}: {first['msg']}") from None
    return req, data, binary


def _count(shape: list[int], limit: int, what: str) -> int:
    """The number of elements of `shape`, refused past `limit` before anything is built (no overflow: ints)."""
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            raise HTTPError(413, f"{what}: shape {shape} holds more than {limit:,} elements")
    return n


def _images(tensor: Tensor, data, binary: bytes, offset: int, size: int, max_images: int) -> tuple[list, int]:
    """One input tensor as a list of images (HxWx3 arrays, or encoded files for BYTES), and the binary
    offset after it."""
    if tensor.name != "images":
        raise HTTPError(400, f"unknown input {tensor.name!r}: the model takes 'images'")
    dtype, shape = tensor.datatype, tensor.shape
    nbytes = (tensor.parameters or {}).get("binary_data_size")
    raw = None
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0 or offset + nbytes > len(binary):
            raise HTTPError(400, f"input 'images': binary_data_size {nbytes!r} runs past the body")
        raw, offset = binary[offset : offset + nbytes], offset + nbytes
    if raw is not None and data is not None:
        raise HTTPError(400, "input 'images': both 'data' and binary data")
    if dtype == "BYTES":
        if raw is None:
            raise HTTPError(400, "input 'images' as BYTES: send the image files as binary data")
        count = _count(shape, max_images, "input 'images'")
        if count * 4 > len(raw):  # counted before anything is built: every element has a 4-byte length
            raise HTTPError(400, f"input 'images': {len(raw)} bytes cannot hold {count} BYTES elements")
        files, at = [], 0
        while at < len(raw):
            if len(files) == count or at + 4 > len(raw):
                raise HTTPError(400, f"input 'images': the BYTES data holds more than shape {shape} says")
            (n,) = struct.unpack_from("<I", raw, at)
            if at + 4 + n > len(raw):
                raise HTTPError(400, f"input 'images': a BYTES element's length prefix ({n:,}) runs past its data")
            files.append(raw[at + 4 : at + 4 + n])
            at += 4 + n
        if len(files) != count:
            raise HTTPError(400, f"input 'images': {len(files)} BYTES elements for shape {shape}")
        return files, offset
    if dtype not in NUMPY:
        raise HTTPError(400, f"input 'images': datatype {dtype!r}; send FP32 or UINT8 pixels, or BYTES files")
    if len(shape) != 4 or shape[1:] != [size, size, 3]:
        raise HTTPError(400, f"input 'images': shape {shape}, expected [N, {size}, {size}, 3] (NHWC, RGB)")
    count = _count(shape, max_images * size * size * 3, "input 'images'")
    if raw is None and not isinstance(data, list):
        raise HTTPError(400, "input 'images': 'data' must be a list of numbers (or send binary data)")
    try:
        if raw is not None:
            if len(raw) != count * np.dtype(NUMPY[dtype]).itemsize:
                raise ValueError(f"{len(raw)} bytes")
            array = np.frombuffer(raw, NUMPY[dtype]).reshape(shape)
        else:
            flat = np.asarray(data, np.float64 if dtype == "FP32" else np.int64)
            if flat.ndim != 1 and flat.size == count:
                flat = flat.ravel()  # nested lists, as some clients send them
            if flat.ndim != 1 or flat.size != count:
                raise ValueError(f"{flat.size} values")
            if dtype == "UINT8" and flat.size and (flat.min() < 0 or flat.max() > 255):
                raise HTTPError(400, "input 'images': UINT8 values must be 0..255")
            array = flat.astype(NUMPY[dtype]).reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise HTTPError(400, f"input 'images': data does not fill shape {shape} as {dtype} ({exc})") from None
    if dtype == "FP32" and not np.isfinite(array).all():
        raise HTTPError(400, "input 'images': pixels must be finite")
    return list(array), offset


def classification(parameters: dict | None, which: str, classes: list) -> int | None:
    """Triton's classification extension: the `classification` parameter of a requested output (an integer
    k >= 1, or absent: None). Only `probabilities` has classes to name."""
    k = (parameters or {}).get("classification")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise HTTPError(400, f"output {which!r}: 'classification' must be an integer >= 1, got {k!r}")
    if which != "probabilities":
        raise HTTPError(400, f"output {which!r}: only 'probabilities' can be classified")
    return min(k, len(classes))


def top_classes(probabilities: np.ndarray, k: int, classes: list) -> list[bytes]:
    """Each row's k most probable classes, best first, as Triton writes them: `score:index:label` (the score
    as C++'s std::to_string writes a float, six decimals), row by row (the tensor's shape is [rows, k])."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [f"{probabilities[r, i]:.6f}:{i}:{classes[i]}".encode() for r in range(len(order)) for i in order[r]]


def bytes_tensor(items: list[bytes]) -> bytes:
    """BYTES elements in the binary tensor format: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@router.post("/models/{name}/infer", summary="Inference (JSON tensors or the binary tensor data extension)",
             response_model=InferResponse, responses=INFER_ERRORS, openapi_extra=INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, name: str, version: str = VERSION):
    s = _model(request, name, version)
    c = s.config
    limit = c.max_files * c.max_batch
    body = await read_body(request, s.body_limits, s.bodies)
    # parsed off the event loop (health probes answer meanwhile), its memory held against the body budget
    async with s.bodies.holding(PARSE_FACTOR * len(body)):
        req, data, binary = await asyncio.to_thread(parse_request, body, request.headers.get(HEADER))
        del body
        images, offset = [], 0
        for tensor, values in zip(req.inputs, data):
            got, offset = await asyncio.to_thread(_images, tensor, values, binary, offset, s.predictor.size,
                                                  limit - len(images))
            images += [(img, isinstance(img, bytes)) for img in got]
        del data
    if not images:
        raise HTTPError(400, "no images: every input's shape is empty")
    if len(images) > limit:
        raise HTTPError(413, f"{len(images)} images in one request; at most {limit}")
    results = await asyncio.gather(*(s.infer(img, i) if encoded else s.infer_pixels(img, i)
                                     for i, (img, encoded) in enumerate(images)))
    wanted = req.outputs or [Output(name="probabilities")]
    outputs, chunks = [], []
    for out in wanted:
        which = out.name
        if which not in ("probabilities", "features"):
            raise HTTPError(400, f"unknown output {which!r}: the model gives 'probabilities' and 'features'")
        k = classification(out.parameters, which, s.predictor.classes)
        value = np.stack([r[0] if which == "probabilities" else r[1] for r, _ in results]).astype(np.float32)
        value = value.reshape(len(value), -1)
        labels = None if k is None else top_classes(value, k, s.predictor.classes)
        entry = {"name": which, "datatype": "FP32" if k is None else "BYTES",
                 "shape": list(value.shape) if k is None else [len(value), k]}
        as_binary = bool((out.parameters or {}).get("binary_data",
                                                    (req.parameters or {}).get("binary_data_output")))
        if as_binary:
            data = value.tobytes() if labels is None else bytes_tensor(labels)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = value.ravel().tolist() if labels is None else [b.decode() for b in labels]
        outputs.append(entry)
    answer = {"model_name": name, "model_version": VERSION, "outputs": outputs,
              "parameters": {"cached": [cached for _, cached in results], "model_id": s.model_id}}
    if req.id is not None:
        answer["id"] = req.id
    head = json.dumps(answer).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER: str(len(head))})
