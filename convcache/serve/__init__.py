"""Serve stage: the fused ONNX model in production, in-process (`Predictor`) and over HTTP.
Nothing here imports TensorFlow."""

from convcache.serve.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
