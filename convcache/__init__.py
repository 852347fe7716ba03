"""convcache: augment offline, extract VGG16 conv features once, train cheap heads, serve one ONNX model."""

__version__ = "0.1.0"
