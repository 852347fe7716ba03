"""ONNX Runtime sessions with device selection, shared by extract and serve."""

from __future__ import annotations

import logging
import platform

import numpy as np

from convcache.errors import ConvcacheError

try:
    import onnxruntime as ort
except ImportError:  # the runtime is an extra: cpu (onnxruntime) or gpu (onnxruntime-gpu), never both
    raise ConvcacheError("no ONNX Runtime is installed: pip install 'convcache[cpu]' (or 'convcache[gpu]' on a "
                         "machine with an NVIDIA GPU; not both, they overwrite each other)") from None

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "openvino")
NULL_DEVICE = "null"  # benchmarks only: no inference, zeros of the right shape (the input pipeline's ceiling)


def cuda_options(exact: bool = False) -> dict:
    """The CUDA provider's options. HEURISTIC avoids cuDNN's exhaustive re-tuning for every new batch shape;
    `prefer_nhwc` runs the (NHWC-input) graph's convolutions in NHWC without layout transposes; TF32 is ONNX
    Runtime's default for fp32 convolutions on Ampere and later (features within ~1e-3 of fp32), `exact` turns
    it off for parity runs."""
    return {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1", "use_tf32": "0" if exact else "1"}


PRECISIONS = ("fp32", "fp16")  # what `extract --precision` runs an extractor in (int8 is an export of its own)
DEVICE_BATCH = {"CUDAExecutionProvider": 256}  # `--batch-size auto`: images per call on each provider (else 32)
CPU_BATCH = 32


def math_mode(provider: str, exact: bool = False, precision: str = "fp32") -> str:
    """How a session's arithmetic is done, as the store's run log records it: rows made in different math modes
    are not bitwise comparable. `precision`: the graph's (an fp16 or int8 export, or fp32 run as fp16)."""
    if precision in ("fp16", "int8"):
        return precision
    if provider == "CUDAExecutionProvider":
        return "fp32" if exact else "tf32"
    return "fp32"


def batch_size_for(provider: str) -> int:
    """`--batch-size auto`: 256 on CUDA (an H200 ran fp32 at 7,413 / 7,472 images/s at batch 128 / 256 and
    fp16 best at 128-256: a large GPU wants large batches), 32 on CPU runtimes (larger batches only cost memory
    there: docs/benchmarks.md)."""
    return DEVICE_BATCH.get(provider, CPU_BATCH)


def to_fp16(proto):
    """The graph in fp16 (weights and activations), float32 input and output: `export --precision fp16` stores
    it; `extract --precision fp16` runs an fp32 extractor this way on CUDA (the store records the math mode)."""
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():  # a warning per weight below fp16's range, each rounded as fp16 must
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(proto, keep_io_types=True)


def uint8_input(proto):
    """The graph fed uint8 pixels: a Cast to float32 in front of its float32 input (under the same name), put
    there with `onnx.compose`. Pixels are whole numbers 0..255, so the features are the float graph's exactly;
    what crosses to a GPU is a quarter of the bytes, and the host never builds the float batch."""
    import onnx
    from onnx import TensorProto, compose, helper

    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    name = inp.name
    cast = helper.make_graph([helper.make_node("Cast", [name + "_uint8"], [name + "_float"], to=TensorProto.FLOAT)],
                             "uint8_input", [helper.make_tensor_value_info(name + "_uint8", TensorProto.UINT8, dims)],
                             [helper.make_tensor_value_info(name + "_float", TensorProto.FLOAT, dims)])
    default = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    front = helper.make_model(cast, opset_imports=[helper.make_opsetid("", default)], ir_version=proto.ir_version)
    merged = compose.merge_models(front, proto, io_map=[(name + "_float", name)])
    onnx.checker.check_model(merged)
    return merged


def host_buffer(shape: tuple, dtype, pinned: bool = False) -> np.ndarray:
    """An empty host array; page-locked (pinned) when asked and PyTorch with CUDA is importable (ONNX Runtime's
    Python API allocates no pinned host memory): a copy to the GPU from pinned memory is one DMA, not staged
    through a driver buffer. Without PyTorch it is ordinary memory (`pinned_host` says which)."""
    if pinned:
        try:
            import torch

            if torch.cuda.is_available():
                # the array's base is the tensor that owns the memory: it lives as long as the array does
                return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), pin_memory=True).numpy()
        except Exception as exc:  # no torch, a CPU-only torch, or no pinned memory: ordinary memory
            log.debug("no pinned host memory (%s)", exc)
    return np.empty(shape, dtype)


def pinned_host(array: np.ndarray) -> bool:
    """Whether `host_buffer` gave page-locked memory (a PyTorch tensor's)."""
    return type(array.base).__module__.startswith("torch")


class BoundRunner:
    """Runs a session with IO binding: `stage(batch)` puts a host batch on the session's device (a copy into
    one of two device buffers of its shape, reused in turn), `run(staged)` runs it with the
    outputs bound to host memory. Staging on another thread than `run` overlaps the copy of batch n + 1 with
    the inference of batch n. One `run` at a time; a buffer is reused two stages later, by which time the run
    that read it has returned (the caller keeps at most one batch in flight besides the one staging)."""

    def __init__(self, session, input_name: str, outputs: list[str], device: str = "cuda", reuse: bool = True):
        self.session, self.input_name, self.outputs, self.device = session, input_name, list(outputs), device
        self.reuse = reuse  # False: a fresh device buffer per stage (callers on many threads: serving)
        self._buffers: dict = {}  # (shape, dtype) -> [two device OrtValues], for full batches
        self._turn = 0

    def stage(self, batch: np.ndarray):
        """The batch in one of the two device buffers of its shape (the CPU: the same code, a host copy), or
        in a fresh one (`reuse` off, or a third shape)."""
        if not self.reuse:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch), self.device, 0)
        key = (batch.shape, batch.dtype.str)
        pair = self._buffers.get(key)
        if pair is None and len(self._buffers) < 2:  # the full batch's shape (and at most one other)
            pair = self._buffers[key] = [ort.OrtValue.ortvalue_from_shape_and_type(
                list(batch.shape), batch.dtype.type, self.device, 0) for _ in range(2)]
        if pair is None:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch), self.device, 0)
        self._turn ^= 1
        value = pair[self._turn]
        value.update_inplace(np.ascontiguousarray(batch))
        return value

    def run(self, staged) -> list[np.ndarray]:
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, staged)
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return [v.numpy() for v in binding.get_outputs()]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.run(self.stage(batch))


def resolve_device(device: str) -> str:
    """What `device` means here: cuda, openvino, cpu (or null), as `create_session` picks it; a runtime that is
    not there is refused now, before any work (extract starts its session in the background)."""
    if device == "openvino" and not openvino_version():
        raise ConvcacheError(OPENVINO_MISSING)
    if device in (NULL_DEVICE, "cpu", "openvino"):
        return device
    if device not in DEVICES:
        raise ConvcacheError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "cuda"
    if device == "cuda":
        raise ConvcacheError("--device cuda: onnxruntime has no CUDA provider here "
                             "(install the 'gpu' extra, onnxruntime-gpu, on a machine with a GPU)")
    return "openvino" if openvino_version() else "cpu"


class NullSession:
    """No inference: zeros of each output's shape (the batch dimension from the input). `convcache bench extract
    --device null` measures the input pipeline (read, hash, decode, augment, write) with the runtime taken out."""

    PROVIDER = "NullExecutionProvider"

    def __init__(self, path=None, shapes: dict | None = None):
        """From a model (its outputs' shapes by shape inference), or from `shapes` (output name -> shape
        without the batch dimension) where the caller has them already, as extract has in the extractor's
        contract: the null device then reads no model at all (loading and inferring a 30 MB one took ~0.1 s a
        run, a runtime's cost the null device is there to take out)."""
        if shapes is not None:
            self._shapes = {name: tuple(shape) for name, shape in shapes.items()}
            return
        import onnx

        model = onnx.load_model_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
        for i in model.graph.input:  # a batch of 1: shape inference then fixes every output's other dims
            i.type.tensor_type.shape.dim[0].dim_value = 1
        model = onnx.shape_inference.infer_shapes(model)
        self._shapes = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim[1:])
                        for o in model.graph.output}
        if any(0 in shape for shape in self._shapes.values()):
            raise ConvcacheError(f"--device null: the outputs' shapes are not static ({self._shapes})")

    def get_providers(self) -> list[str]:
        return [self.PROVIDER]

    def run(self, names, feeds: dict):
        n = len(next(iter(feeds.values())))
        return [np.zeros((n, *self._shapes[name]), np.float32) for name in (names or list(self._shapes))]


def create_session(path, device: str = "auto", threads: int | None = None, exact: bool = False):
    """A session for an ONNX file (or its bytes, as Dask workers receive it). `auto`: ONNX Runtime's
    CUDA provider when there is one, else the OpenVINO runtime when it is installed (the faster CPU
    runtime measured here), else ONNX Runtime on the CPU. Every session answers `run` and
    `get_providers` as ONNX Runtime's does; the provider actually used is what `get_providers()[0]`
    says."""
    if device == NULL_DEVICE:
        return NullSession(path)
    if device not in DEVICES:
        raise ConvcacheError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "openvino" or (device == "auto" and not has_cuda and openvino_version()):
        return OpenVINOSession(path, threads)
    if device == "cuda" and not has_cuda:
        raise ConvcacheError("--device cuda: onnxruntime has no CUDA provider here "
                             "(install the 'gpu' extra, onnxruntime-gpu, on a machine with a GPU)")
    providers = [("CUDAExecutionProvider", cuda_options(exact)), "CPUExecutionProvider"] \
        if device != "cpu" and has_cuda else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=providers)
    except Exception as exc:
        name = "the model" if isinstance(path, bytes) else path
        raise ConvcacheError(f"cannot load {name} in ONNX Runtime: {exc}") from None
    active = session.get_providers()[0]  # ORT can fall back to CPU silently: check what is real
    if device == "cuda" and active != "CUDAExecutionProvider":
        raise ConvcacheError(f"CUDA: ONNX Runtime has the provider but could not start it (it fell back to {active}; "
                             "its log names the library it could not load); --device cpu runs on the CPU")
    log.info("ONNX Runtime provider: %s", active)
    return session


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count): the default number of
    decoding workers of extract and predict."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name, written beside every timing (absolute speeds differ ~2x between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


OPENVINO_MISSING = "--device openvino: the OpenVINO runtime is not installed (pip install 'convcache[openvino]')"


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


class OpenVINOSession:
    """The same ONNX file compiled by the OpenVINO runtime (the `openvino` package, which installs beside
    onnxruntime; `onnxruntime-openvino` would replace the onnxruntime module). fp32 models run at f32
    (`INFERENCE_PRECISION_HINT`: OpenVINO would otherwise pick bf16 on CPUs that have it), so features
    agree with ONNX Runtime's within the export parity bound. One infer request per thread."""

    PROVIDER = "OpenVINO-CPU"

    def __init__(self, path, threads: int | None = None):
        import threading

        if not openvino_version():
            raise ConvcacheError(OPENVINO_MISSING)
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            if isinstance(path, bytes):  # a Dask worker's scattered model: OpenVINO reads ONNX from a file
                import tempfile

                with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
                    f.write(path)
                    f.flush()
                    model = core.read_model(f.name)
            else:
                model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # an op OpenVINO has no conversion for, and the like
            name = "the model" if isinstance(path, bytes) else path
            raise ConvcacheError(f"cannot load {name} in OpenVINO: {str(exc).splitlines()[0][:300]}") from None
        self.outputs = {name: o for o in self.compiled.outputs for name in o.get_names()}
        self.output_order = [o.get_any_name() for o in self.compiled.outputs]
        self._local = threading.local()
        log.info("OpenVINO %s on CPU", openvino_version())

    def get_providers(self) -> list[str]:
        return [self.PROVIDER]

    def run(self, output_names, feeds: dict) -> list:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({name: value for name, value in feeds.items()})
        names = output_names or self.output_order
        return [np.array(result[self.outputs[n]]) for n in names]


# what `get_providers()[0]` says of the session `create_session` makes for each of `resolve_device`'s answers
PROVIDER_OF = {NULL_DEVICE: NullSession.PROVIDER, "openvino": OpenVINOSession.PROVIDER, "cpu": "CPUExecutionProvider",
               "cuda": "CUDAExecutionProvider"}


ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


def report() -> dict:
    """What this machine can run: the installed ONNX Runtime distributions (they all install the one
    `onnxruntime` module, so two of them overwrite each other), the providers the active build offers,
    OpenVINO, the CPU, and what `--device auto` picks."""
    from importlib import metadata

    installed = {}
    for dist in ORT_DISTRIBUTIONS:
        try:
            installed[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    providers = ort.get_available_providers()
    out = {"onnxruntime": ort.__version__, "onnxruntime_distributions": installed, "providers": providers,
           "openvino": openvino_version(), "cpu": cpu_model(),
           "auto": "cuda" if "CUDAExecutionProvider" in providers else "openvino" if openvino_version() else "cpu",
           "problems": []}
    if len(installed) > 1:
        out["problems"].append(f"{' and '.join(sorted(installed))} are all installed and overwrite each other's "
                               "`onnxruntime` module: keep one (pip uninstall the others, then reinstall it)")
    if "onnxruntime-gpu" in installed and "CUDAExecutionProvider" not in providers:
        out["problems"].append("onnxruntime-gpu is installed but the active build offers no CUDA provider")
    if out["openvino"]:
        import openvino as ov

        out["openvino_devices"] = ov.Core().available_devices
    return out
