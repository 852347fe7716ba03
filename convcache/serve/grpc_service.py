"""KServe's v2 `GRPCInferenceService` (the Open Inference Protocol over gRPC), beside the HTTP routes and behind
the same `InferenceService`: one serving loop (batching, cache, limits), the same tensor rules as `/v2`
(`oip._images`), and the same metrics (request count and latency, labelled `method="GRPC"` and the gRPC status).

The messages and the servicer base are the modules generated from the published protocol files that
`tritonclient[grpc]` ships (`tritonclient.grpc.service_pb2`, `service_pb2_grpc`); nothing here is written by
hand. Served: ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelInfer (typed `contents`
or `raw_input_contents`; FP32 or UINT8 pixels, BYTES image files; the classification extension's
`classification` parameter on an output), and Triton's extensions ModelConfig, ModelStatistics and
RepositoryIndex. Errors map to the codes the protocol names: an unknown model NOT_FOUND, a
bad tensor INVALID_ARGUMENT, too many images RESOURCE_EXHAUSTED, overload UNAVAILABLE."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
import numpy as np
from google.protobuf import json_format
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from convcache.serve import oip
from convcache.serve.errors import HTTPError
from convcache.serve.metrics import BUSY
from convcache.serve.service import InferenceService

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}


def _observed(method):
    """Count and time each call as the HTTP middleware does; an HTTPError becomes the protocol's status code."""

    @functools.wraps(method)
    async def call(self, request, context):
        start, code = time.perf_counter(), grpc.StatusCode.OK
        metrics, endpoint = self.service.metrics, f"/{SERVICE}/{method.__name__}"
        s = self.service
        admitted = method.__name__ not in ("ServerLive", "ServerReady", "ModelReady")
        try:
            if admitted and s.in_flight >= s.config.max_connections:
                raise HTTPError(503, BUSY)
            s.in_flight += admitted
            try:
                return await method(self, request, context)
            finally:
                s.in_flight -= admitted
        except HTTPError as exc:
            code = CODES.get(exc.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in %s", endpoint)
            await context.abort(code, "internal error")
        finally:
            metrics.latency.labels(endpoint, "GRPC").observe(time.perf_counter() - start)
            metrics.requests.labels(endpoint, "GRPC", code.name).inc()
            if code != grpc.StatusCode.OK:
                metrics.errors.labels(code.name).inc()

    return call


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService):
        self.service = service

    def _model(self, name: str, version: str) -> InferenceService:
        s = self.service
        if name != s.name:
            raise HTTPError(404, f"unknown model '{name}' (this server serves '{s.name}')")
        if version not in ("", oip.VERSION):
            raise HTTPError(404, f"model '{name}' has no version {version!r} (it has version {oip.VERSION})")
        return s

    @_observed
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    @_observed
    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.service.ready)

    @_observed
    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self._model(request.name, request.version).ready)

    @_observed
    async def ServerMetadata(self, request, context):
        from convcache import __version__

        return service_pb2.ServerMetadataResponse(name="convcache", version=__version__,
                                                  extensions=["classification", "model_configuration",
                                                              "statistics"])

    @_observed
    async def ModelMetadata(self, request, context):
        s = self._model(request.name, request.version)
        meta = oip.metadata(s, request.name)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    @_observed
    async def ModelConfig(self, request, context):
        s = self._model(request.name, request.version)
        config = json_format.ParseDict(oip.served_config(s, request.name), model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=config)

    @_observed
    async def ModelStatistics(self, request, context):
        s = self.service if not request.name else self._model(request.name, request.version)
        return json_format.ParseDict({"model_stats": [s.metrics.stats.report(s.name, oip.VERSION)]},
                                     service_pb2.ModelStatisticsResponse())

    @_observed
    async def RepositoryIndex(self, request, context):
        s = self.service
        state = "READY" if s.ready else "UNAVAILABLE"
        return service_pb2.RepositoryIndexResponse(
            models=[service_pb2.RepositoryIndexResponse.ModelIndex(name=s.name, version=oip.VERSION, state=state)])

    @_observed
    async def ModelInfer(self, request, context):
        s = self._model(request.model_name, request.model_version)
        c = s.config
        limit = c.max_files * c.max_batch
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise HTTPError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        if not request.inputs:
            raise HTTPError(400, "no inputs")
        images = []
        for i, t in enumerate(request.inputs):
            got = await asyncio.to_thread(_tensor_images, t, raw[i] if raw else None, s.predictor.size,
                                          limit - len(images))
            images += [(img, isinstance(img, bytes)) for img in got]
        if not images:
            raise HTTPError(400, "no images: every input's shape is empty")
        results = await asyncio.gather(*(s.infer(img, i) if encoded else s.infer_pixels(img, i)
                                         for i, (img, encoded) in enumerate(images)))
        wanted = [(o.name, _parameters(o.parameters)) for o in request.outputs] or [("probabilities", {})]
        outputs, contents = [], []
        for which, parameters in wanted:
            if which not in ("probabilities", "features"):
                raise HTTPError(400, f"unknown output {which!r}: the model gives 'probabilities' and 'features'")
            k = oip.classification(parameters, which, s.predictor.classes)
            value = np.stack([r[0] if which == "probabilities" else r[1] for r, _ in results]).astype(np.float32)
            value = value.reshape(len(value), -1)
            tensor = service_pb2.ModelInferResponse.InferOutputTensor
            if k is None:
                outputs.append(tensor(name=which, datatype="FP32", shape=list(value.shape)))
                contents.append(value.tobytes())
            else:  # Triton's classification extension: BYTES [rows, k] of `score:index:label`
                outputs.append(tensor(name=which, datatype="BYTES", shape=[len(value), k]))
                contents.append(oip.bytes_tensor(oip.top_classes(value, k, s.predictor.classes)))
        answer = service_pb2.ModelInferResponse(model_name=s.name, model_version=oip.VERSION, id=request.id,
                                                outputs=outputs, raw_output_contents=contents)
        answer.parameters["model_id"].string_param = s.model_id
        answer.parameters["cached"].string_param = ",".join("1" if cached else "0" for _, cached in results)
        return answer


def _parameters(parameters) -> dict:
    """A protobuf map of InferParameter as plain values (the one field each parameter sets)."""
    return {key: getattr(p, p.WhichOneof("parameter_choice")) for key, p in parameters.items()
            if p.WhichOneof("parameter_choice")}


def _tensor_images(t, raw: bytes | None, size: int, max_images: int) -> list:
    """One input tensor of a gRPC request as images, by the same rules as `/v2`'s (`oip._images`)."""
    try:
        tensor = oip.Tensor(name=t.name, shape=list(t.shape), datatype=t.datatype,
                            parameters=None if raw is None else {"binary_data_size": len(raw)})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise HTTPError(400, f"input {t.name!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if raw is not None:
        return oip._images(tensor, None, raw, 0, size, max_images)[0]
    contents = t.contents
    if t.datatype == "BYTES":  # typed BYTES: each element one image file
        files = list(contents.bytes_contents)
        count = oip._count(tensor.shape, max_images, f"input {t.name!r}")
        if len(files) != count:
            raise HTTPError(400, f"input {t.name!r}: {len(files)} BYTES elements for shape {list(t.shape)}")
        return files
    data = {"FP32": contents.fp32_contents, "UINT8": contents.uint_contents}.get(t.datatype)
    return oip._images(tensor, None if data is None else list(data), b"", 0, size, max_images)[0]


async def start(service: InferenceService, host: str, port: int):
    """A started grpc.aio server on host:port in this event loop (SO_REUSEPORT: every worker binds it)."""
    limit = service.config.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 1 << 30), ("grpc.so_reuseport", 1)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    if not server.add_insecure_port(f"{host}:{port}"):
        raise OSError(f"cannot listen on {host}:{port} for gRPC")
    await server.start()
    return server
