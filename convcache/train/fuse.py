"""fuse: extractor + head -> one ONNX graph from pixels to class probabilities (and the features)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import onnx
from onnx import compose, helper

from convcache.errors import ConvcacheError
from convcache.onnxmeta import get_metadata, graph_sha256, load_model, set_metadata


def fuse(extractor_path: str, head_dir: str, output: str) -> dict:
    head_path = Path(head_dir) / "head.onnx" if Path(head_dir).is_dir() else Path(head_dir)
    extractor, head = load_model(extractor_path), load_model(head_path)
    ext_meta, head_meta = get_metadata(extractor), get_metadata(head)
    if ext_meta.get("kind") != "extractor" or head_meta.get("kind") != "head":
        raise ConvcacheError("fuse needs an extractor from `convcache export` and a head from `convcache train`")
    ext_sha = graph_sha256(extractor)
    if head_meta["extractor_sha256"] != ext_sha:
        raise ConvcacheError(f"the head was trained on features of extractor {head_meta['extractor_sha256'][:12]}, "
                             f"not of {extractor_path} ({ext_sha[:12]})")

    head = compose.add_prefix(head, "head/")
    graph = onnx.GraphProto()
    graph.CopyFrom(extractor.graph)
    graph.name = "convcache_fused"
    graph.node.append(helper.make_node("Flatten", ["features"], ["head/features"], axis=1, name="flatten_features"))
    graph.node.extend(head.graph.node)
    graph.node.append(helper.make_node("Identity", ["head/probabilities"], ["probabilities"], name="probabilities"))
    graph.initializer.extend(head.graph.initializer)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT,
                                                       [None, len(head_meta["classes"])]),
                         extractor.graph.output[0]])
    opsets = {}
    for op in list(extractor.opset_import) + list(head.opset_import):
        opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="convcache")
    model.ir_version = max(extractor.ir_version, head.ir_version)
    onnx.checker.check_model(model, full_check=True)
    meta = {"kind": "fused", "classes": head_meta["classes"], "head": head_meta["head"],
            "input": ext_meta["input"], "preprocessing": ext_meta["preprocessing"],
            "outputs": {"probabilities": [None, len(head_meta["classes"])], "features": ext_meta["output"]["shape"]},
            "extractor": {k: ext_meta.get(k) for k in ("weights", "layer", "pooling", "precision", "versions",
                                                       "created")} | {"sha256": ext_sha},
            "head_provenance": {**head_meta.get("provenance", {}), "sha256": head_meta.get("graph_sha256")},
            "graph_sha256": graph_sha256(model), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    set_metadata(model, meta)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(output))
    return meta
