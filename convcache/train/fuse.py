"""fuse: extractor + head -> one ONNX graph from pixels to class probabilities (and the features)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from convcache import artifacts
from convcache.artifacts.compose import join, select_outputs
from convcache.errors import ConvcacheError


def fuse(extractor_path: str, head_dir: str, output: str) -> dict:
    head_path = Path(head_dir) / "head.onnx" if Path(head_dir).is_dir() else Path(head_dir)
    extractor_proto, head_proto = artifacts.load_model(extractor_path), artifacts.load_model(head_path)
    ext = artifacts.Extractor.from_proto(extractor_proto, str(extractor_path))
    head = artifacts.Head.from_proto(head_proto, str(head_path))
    if head.extractor_identity != ext.identity:
        raise ConvcacheError(f"the head was trained on features of extractor {head.extractor_identity[:12]}, "
                             f"not of {extractor_path} ({ext.identity[:12]})")
    features = ext.output_name
    if head.taps:  # a head on taps: the extractor is cut down to them (flattened, concatenated)
        sizes = {t.name: int(np.prod(t.shape)) for t in ext.outputs}
        given = sum(sizes.get(t, 0) for t in head.taps)
        if any(t not in sizes for t in head.taps) or given != head.n_features:
            raise ConvcacheError(f"the head reads taps {', '.join(head.taps)} ({head.n_features} features); the "
                                 f"extractor has {', '.join(f'{n} ({k})' for n, k in sizes.items())}")
        extractor_proto = select_outputs(extractor_proto, list(head.taps), artifacts.FEATURES, given)
        features = artifacts.FEATURES
    elif head.n_features != ext.n_features:
        raise ConvcacheError(f"the head takes {head.n_features} features, the extractor gives {ext.n_features}")
    model = join(extractor_proto, head_proto, features, head.input_name, head.output_name)
    fused = artifacts.Fused.of(ext, head, datetime.now(timezone.utc).isoformat(timespec="seconds")).write(model)
    artifacts.save_model(model, output)
    return fused.metadata
