"""ONNX Runtime sessions with device selection, shared by extract and serve."""

from __future__ import annotations

import logging
import platform

import onnxruntime as ort

from convcache.errors import ConvcacheError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# HEURISTIC avoids cuDNN's exhaustive re-tuning for every new batch shape.
_CUDA = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})


def create_session(path, device: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """A session for an ONNX file (or its bytes, as Dask workers receive it)."""
    if device not in DEVICES:
        raise ConvcacheError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ConvcacheError("--device cuda: onnxruntime has no CUDA provider here "
                             "(install the 'gpu' extra, onnxruntime-gpu, on a machine with a GPU)")
    providers = [_CUDA, "CPUExecutionProvider"] if device != "cpu" and has_cuda else ["CPUExecutionProvider"]
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
