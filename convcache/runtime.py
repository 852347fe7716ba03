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


def math_mode(provider: str, exact: bool = False, dtype: str = "float32") -> str:
    """How a session's arithmetic is done, as the store's run log records it: rows made in different math modes
    are not bitwise comparable."""
    if provider == "CUDAExecutionProvider":
        return "fp16" if dtype == "float16" else ("fp32" if exact else "tf32")
    return "fp32"


class NullSession:
    """No inference: zeros of each output's shape (the batch dimension from the input). `convcache bench extract
    --device null` measures the input pipeline (read, hash, decode, augment, write) with the runtime taken out."""

    PROVIDER = "NullExecutionProvider"

    def __init__(self, path):
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
        raise ConvcacheError(f"--device cuda: ONNX Runtime fell back to {active}")
    log.info("ONNX Runtime provider: %s", active)
    return session


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
            raise ConvcacheError("--device openvino: the OpenVINO runtime is not installed "
                                 "(pip install 'convcache[openvino]')")
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
