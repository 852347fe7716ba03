"""Import TensorFlow/Keras with their start-up noise silenced (only the stages that need them call this).

TensorFlow's C++ start-up lines go straight to file descriptor 2, before TF_CPP_MIN_LOG_LEVEL is
read by absl, so the import runs with fd 2 pointed at /dev/null. CONVCACHE_TF_VERBOSE=1 shows them.
"""

import contextlib
import logging
import os
import warnings

_loaded = None


@contextlib.contextmanager
def _stderr_silenced():
    if os.environ.get("CONVCACHE_TF_VERBOSE") == "1":
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_keras():
    global _loaded
    if _loaded is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        warnings.filterwarnings("ignore", module="tensorflow")
        warnings.filterwarnings("ignore", module="keras")
        with _stderr_silenced():
            import keras
            import tensorflow as tf
            import tf2onnx  # noqa: F401 - imported here so its TF start-up is silenced too

            tf.config.list_physical_devices()  # device discovery prints its own lines
        tf.get_logger().setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)
        _loaded = (tf, keras)
    return _loaded
