"""fuse: extractor + head -> one ONNX graph from pixels to class probabilities (and the features)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from convcache import artifacts
from convcache.artifacts.compose import join
from convcache.errors import ConvcacheError


def fuse(extractor_path: str, head_dir: str, output: str) -> dict:
    head_path = Path(head_dir) / "head.onnx" if Path(head_dir).is_dir() else Path(head_dir)
    extractor_proto, head_proto = artifacts.load_model(extractor_path), artifacts.load_model(head_path)
    ext = artifacts.Extractor.from_proto(extractor_proto, str(extractor_path))
    head = artifacts.Head.from_proto(head_proto, str(head_path))
    if head.extractor_identity != ext.identity:
        raise ConvcacheError(f"the head was trained on features of extractor {head.extractor_identity[:12]}, "
                             f"not of {extractor_path} ({ext.identity[:12]})")
    if head.n_features != ext.n_features:
        raise ConvcacheError(f"the head takes {head.n_features} features, the extractor gives {ext.n_features}")
    model = join(extractor_proto, head_proto, ext.output_name, head.input_name, head.output_name)
    fused = artifacts.Fused.of(ext, head, datetime.now(timezone.utc).isoformat(timespec="seconds")).write(model)
    artifacts.save_model(model, output)
    return fused.metadata
