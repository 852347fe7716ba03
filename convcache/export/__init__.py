"""Export stage: VGG16's conv base (Keras) to a verified ONNX feature extractor."""
