"""Train stage: heads on cached features, the end-to-end TensorFlow reference, the comparison, fusion."""
