"""VGG16's conv base in Keras with its weight sources, shared by export and the TensorFlow reference."""
