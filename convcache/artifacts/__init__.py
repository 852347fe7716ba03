"""The ONNX artifacts' contracts, in one place.

Stages meet only through artifacts: ONNX models carrying `convcache.*` metadata (an extractor from
`export`, a head from `train`, a fused model from `fuse`) and the Zarr feature store from `extract`
(`convcache.store` owns that one). This package states what each model artifact promises (kind, tensor
names, shapes, identity, provenance): each contract class has one writer (`write`, from its typed fields)
and one reader (`from_proto`), so that no stage writes or digs into raw metadata. A malformed or foreign
artifact is refused with a message that names what is wrong. Only `convcache.artifacts.metadata` touches
an ONNX model's `metadata_props`.

- `metadata`: the `convcache.*` metadata properties, the identity (`graph_sha256`), loading;
- `convert`: Keras and head weights -> ONNX, parity checks;
- `compose`: extractor + head -> one graph (`onnx.compose`).

Identity: `graph_sha256` in every model's metadata is the model's *identity*: a hash of what
determines its outputs (weights, op types and attributes, the wiring, the input spec; see
`convcache.artifacts.metadata.graph_sha256`), never of the names a converter generated. It is the model id
used everywhere: `info`, the feature store, heads, the service's answers, OpenAPI and metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import onnx

from convcache.artifacts.metadata import get_metadata, graph_sha256, load_model, set_metadata
from convcache.errors import ConvcacheError

# tensor names every convcache model uses
IMAGES, FEATURES, PROBABILITIES = "images", "features", "probabilities"
KIND_EXTRACTOR, KIND_HEAD, KIND_FUSED = "extractor", "head", "fused"


@dataclass(frozen=True)
class Tap:
    """One named output of an extractor: the activation after `layer`, global-`pooling`-ed (avg or max) or
    the map itself (None). Its name is `layer` or `layer_pooling` (`block4_pool_avg`); `shape` is without
    the batch axis."""

    layer: str
    pooling: str | None = None
    shape: tuple = ()

    @property
    def name(self) -> str:
        return self.layer if self.pooling is None else f"{self.layer}_{self.pooling}"

    @classmethod
    def parse(cls, spec: str) -> Tap:
        """`block4_pool:avg`, `block4_pool:max` or `block5_pool` (the map)."""
        layer, _, pooling = str(spec).strip().partition(":")
        if pooling not in ("", "avg", "max") or not layer:
            raise ConvcacheError(f"tap {spec!r}: expected LAYER, LAYER:avg or LAYER:max (e.g. block4_pool:avg)")
        return cls(layer, pooling or None)

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "pooling": self.pooling, "shape": list(self.shape)}


# `export --taps` with no list: block3..5, each average- and max-pooled, and the book's block5_pool map
DEFAULT_TAPS = ("block3_pool:avg", "block3_pool:max", "block4_pool:avg", "block4_pool:max", "block5_pool:avg",
                "block5_pool:max", "block5_pool")


def _need(meta: dict, keys: tuple, where: str) -> None:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ConvcacheError(f"{where}: convcache metadata lacks {', '.join(missing)}")


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """What every model artifact has: its identity and its raw `convcache.*` metadata."""

    kind: ClassVar[str] = ""
    identity: str = ""  # empty until written: `write` computes it from the graph
    input_name: str = ""
    output_name: str = ""
    opset: int = 0
    metadata: dict = field(default_factory=dict, compare=False, repr=False)
    provenance: dict = field(default_factory=dict, compare=False, repr=False)  # recorded, not part of the contract

    def to_metadata(self) -> dict:
        raise NotImplementedError

    def write(self, proto: onnx.ModelProto):
        """Annotate `proto` as this artifact (the identity is computed here, never passed in) and return the
        contract as a reader reads it back: what we write, we can read."""
        return write_metadata(proto, self.kind, {**self.provenance, **self.to_metadata()})


@dataclass(frozen=True, kw_only=True)
class Extractor(Artifact):
    """`export`'s artifact: pixels (NHWC float32 0-255, RGB) -> conv features."""

    kind: ClassVar[str] = KIND_EXTRACTOR
    size: int
    feature_shape: tuple  # without the batch axis
    layer: str | None = None
    pooling: str | None = None
    precision: str = "fp32"
    preprocess: str = "caffe"  # caffe or rescale (extractors written before the choice existed are caffe)
    weights_source: str | None = None  # hed, imagenet, random or a file
    weights_sha256: str | None = None
    weights_seed: int = 0
    taps: tuple = ()  # several named outputs from one pass (`export --taps`); () for a one-output extractor

    @property
    def outputs(self) -> tuple:
        """Every output as a Tap: the taps, or the one output (named `features`)."""
        return self.taps or (Tap(self.layer or "block5_pool", self.pooling, tuple(self.feature_shape)),)

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.taps] if self.taps else [self.output_name or FEATURES]

    @property
    def n_features(self) -> int:
        n = 1
        for d in self.feature_shape:
            n *= int(d)
        return n

    def to_metadata(self) -> dict:
        return {"precision": self.precision, "opset": self.opset,
                "weights": {"source": self.weights_source, "sha256": self.weights_sha256,
                            **({"seed": self.weights_seed} if self.weights_source == "random" else {})},
                "input": {"name": self.input_name or IMAGES, "layout": "NHWC", "dtype": "float32", "size": self.size,
                          "pixels": "RGB, 0-255"},
                "preprocess": self.preprocess,
                "output": {"name": self.output_name or FEATURES, "shape": [None, *self.feature_shape]},
                "layer": self.layer, "pooling": self.pooling,
                **({"taps": [t.to_dict() for t in self.taps]} if self.taps else {})}

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, where: str = "model") -> Extractor:
        meta, identity = _kind(proto, KIND_EXTRACTOR, where, "run `convcache export` first")
        return cls.from_metadata(meta, identity, _opset(proto), where)

    @classmethod
    def from_metadata(cls, meta: dict, identity: str, opset: int | None = None, where: str = "model") -> Extractor:
        """From the extractor's metadata as a feature store records it (its `extractor` attribute)."""
        _need(meta, ("input", "output"), where)
        try:
            w = meta.get("weights") or {}
            return cls(identity=identity, input_name=meta["input"].get("name", IMAGES),
                       output_name=meta["output"].get("name", FEATURES), size=int(meta["input"]["size"]),
                       feature_shape=tuple(int(d) for d in meta["output"]["shape"][1:]),
                       opset=int(opset if opset is not None else meta.get("opset", 17)),
                       layer=meta.get("layer"), pooling=meta.get("pooling"), precision=meta.get("precision", "fp32"),
                       preprocess=meta.get("preprocess", "caffe"), weights_source=w.get("source"),
                       weights_sha256=w.get("sha256"), weights_seed=int(w.get("seed", 0)),
                       taps=tuple(Tap(t["layer"], t.get("pooling"), tuple(int(d) for d in t["shape"]))
                                  for t in meta.get("taps") or ()), metadata=meta)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConvcacheError(f"{where}: malformed extractor metadata ({exc.__class__.__name__}: {exc})") from None


@dataclass(frozen=True, kw_only=True)
class Head(Artifact):
    """`train`'s artifact: flattened features -> class probabilities, trained on one extractor's features."""

    kind: ClassVar[str] = KIND_HEAD
    head: str
    classes: tuple
    n_features: int
    extractor_identity: str
    feature_shape: tuple = ()
    trained_on: dict = field(default_factory=dict, compare=False)  # the store, split sizes, ... (`provenance` key)
    taps: tuple = ()  # the tapped extractor's outputs it reads, flattened and concatenated in this order

    def to_metadata(self) -> dict:
        return {"head": self.head, "classes": list(self.classes), "n_features": int(self.n_features),
                "feature_shape": list(self.feature_shape), "extractor_sha256": self.extractor_identity,
                "provenance": self.trained_on, **({"taps": list(self.taps)} if self.taps else {})}

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, where: str = "model") -> Head:
        meta, identity = _kind(proto, KIND_HEAD, where, "train one with `convcache train`")
        _need(meta, ("head", "classes", "n_features", "extractor_sha256"), where)
        names = [i.name for i in proto.graph.input]
        outs = [o.name for o in proto.graph.output]
        if FEATURES not in names or PROBABILITIES not in outs:
            raise ConvcacheError(f"{where}: a head must map '{FEATURES}' to '{PROBABILITIES}' (has {names} -> {outs})")
        if not isinstance(meta["classes"], list) or len(set(map(str, meta["classes"]))) != len(meta["classes"]) \
                or len(meta["classes"]) < 2:
            raise ConvcacheError(f"{where}: metadata classes must be a list of at least 2 distinct names")
        _check_classes(proto, tuple(meta["classes"]), where)
        return cls(identity=identity, head=meta["head"], classes=tuple(meta["classes"]),
                   n_features=int(meta["n_features"]), extractor_identity=meta["extractor_sha256"], opset=_opset(proto),
                   feature_shape=tuple(meta.get("feature_shape") or (int(meta["n_features"]),)),
                   trained_on=dict(meta.get("provenance") or {}), taps=tuple(meta.get("taps") or ()),
                   input_name=FEATURES, output_name=PROBABILITIES, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class Fused(Artifact):
    """`fuse`'s artifact: pixels -> probabilities (and the features), served without TensorFlow."""

    kind: ClassVar[str] = KIND_FUSED
    classes: tuple
    size: int
    outputs: tuple = (PROBABILITIES, FEATURES)
    head: str = ""
    feature_shape: tuple = ()  # of the `features` output, without the batch axis
    preprocess: str = "caffe"
    extractor: dict = field(default_factory=dict, compare=False)  # identity (sha256), weights, layer, pooling, ...
    head_provenance: dict = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, extractor: Extractor, head: Head, created: str) -> Fused:
        """The contract of `extractor` + `head` joined (`convcache.artifacts.compose.join`), before it is written."""
        ext = extractor.metadata
        taps = {"taps": list(head.taps)} if head.taps else {}  # the outputs the fused graph kept
        return cls(classes=tuple(head.classes), size=extractor.size, head=head.head,
                   feature_shape=(head.n_features,) if head.taps else tuple(extractor.feature_shape),
                   preprocess=extractor.preprocess,
                   extractor={k: ext.get(k) for k in ("weights", "layer", "pooling", "precision", "versions", "created",
                                                      "opset")} | {"sha256": extractor.identity, **taps},
                   head_provenance={**head.trained_on, "sha256": head.identity},
                   provenance={"input": ext["input"], "preprocessing": ext.get("preprocessing"), "created": created})

    def to_metadata(self) -> dict:
        return {"classes": list(self.classes), "head": self.head, "preprocess": self.preprocess,
                "outputs": {PROBABILITIES: [None, len(self.classes)], FEATURES: [None, *self.feature_shape]},
                "extractor": self.extractor, "head_provenance": self.head_provenance,
                "input": {**self.provenance.get("input", {}), "size": self.size}}

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, where: str = "model") -> Fused:
        meta, identity = _kind(proto, KIND_FUSED, where, "make one with `convcache fuse`")
        _need(meta, ("classes", "input"), where)
        try:
            size = int(meta["input"]["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConvcacheError(f"{where}: malformed input size in metadata ({exc})") from None
        dims = proto.graph.input[0].type.tensor_type.shape.dim if proto.graph.input else []
        graph_size = [d.dim_value for d in dims[1:3]] if len(dims) == 4 else []
        if graph_size and all(graph_size) and graph_size != [size, size]:
            raise ConvcacheError(f"{where}: metadata says input {size}x{size}, the graph takes "
                                 f"{graph_size[0]}x{graph_size[1]}")
        classes = tuple(meta["classes"]) if isinstance(meta["classes"], list) else ()
        if not classes or len(set(classes)) != len(classes):
            raise ConvcacheError(f"{where}: metadata classes must be distinct and non-empty, got {meta['classes']!r}")
        _check_classes(proto, classes, where)
        shape = ((meta.get("outputs") or {}).get(FEATURES) or [None])[1:]
        return cls(identity=identity, classes=classes, size=size, input_name=IMAGES, output_name=PROBABILITIES,
                   opset=_opset(proto), head=str(meta.get("head") or ""),
                   feature_shape=tuple(int(d) for d in shape if d is not None),
                   preprocess=meta.get("preprocess", "caffe"), extractor=dict(meta.get("extractor") or {}),
                   head_provenance=dict(meta.get("head_provenance") or {}), metadata=meta)


ARTIFACTS = {a.kind: a for a in (Extractor, Head, Fused)}


_NOUN = {KIND_EXTRACTOR: "a convcache extractor", KIND_HEAD: "a convcache head", KIND_FUSED: "a fused convcache model"}


def _kind(proto, kind: str, where: str, hint: str) -> tuple[dict, str]:
    """The artifact's metadata and its identity, recomputed from the graph and checked against the one
    recorded when it was written: a model whose weights or wiring changed since is refused."""
    try:
        meta = get_metadata(proto)
    except ValueError as exc:
        raise ConvcacheError(f"{where}: convcache metadata is not valid JSON ({exc})") from None
    if meta.get("kind") != kind:
        found = meta.get("kind")
        raise ConvcacheError(f"{where} is not {_NOUN[kind]}" + (f" (it is {_NOUN.get(found, repr(found))})" if found
                                                                  else "") + f"; {hint}")
    identity = graph_sha256(proto)
    recorded = meta.get("graph_sha256")
    if recorded is not None and recorded != identity:
        raise ConvcacheError(f"{where}: the graph's identity {identity[:12]} is not the one recorded when it was "
                             f"written ({str(recorded)[:12]}): its weights or wiring changed since; refusing it")
    return meta, identity


def _check_classes(proto: onnx.ModelProto, classes: tuple, where: str) -> None:
    """The probabilities output has one column per class (when the graph states its width)."""
    out = next((o for o in proto.graph.output if o.name == PROBABILITIES), None)
    dims = out.type.tensor_type.shape.dim if out is not None else []
    width = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None
    if width is not None and width != len(classes):
        raise ConvcacheError(f"{where}: its metadata lists {len(classes)} classes ({', '.join(map(str, classes))}) "
                             f"for {width} output probabilities")


def read(path: str | os.PathLike, kind: str | None = None):
    """Read a model's contract: an Extractor, Head or Fused (checked against `kind` when given)."""
    proto = load_model(path)
    found = get_metadata(proto).get("kind") if kind is None else kind
    if found not in ARTIFACTS:
        raise ConvcacheError(f"{path} carries no convcache metadata (kind {found!r})")
    return ARTIFACTS[found].from_proto(proto, str(path))


def write_metadata(proto: onnx.ModelProto, kind: str, meta: dict):
    """Annotate `proto` as a `kind` artifact (the identity is computed here, never passed in); returns the
    contract read back. Stages call a contract's `write`."""
    full = {**meta, "kind": kind, "graph_sha256": graph_sha256(proto)}
    set_metadata(proto, full)
    return ARTIFACTS[kind].from_proto(proto, f"the {kind} being written")  # what we write, we can read


def save_model(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file beside the target, then a rename."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)


def describe(path: str | os.PathLike) -> dict:
    """Any ONNX file: inputs, outputs (name, type, shape), opsets, and convcache metadata if any."""
    proto = load_model(path, load_weights=False)

    def io(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            # a converter's generated names (tf2onnx's unk__160) say nothing: show an unknown size as null
            dims = [d.dim_value if d.HasField("dim_value") else
                    (d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None)
                    for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
                        if t.elem_type else None, "shape": dims})
        return out

    inits = {i.name for i in proto.graph.initializer}
    meta = get_metadata(proto)
    outputs = io(proto.graph.output)
    recorded = (meta.get("outputs") or {}) if meta.get("kind") == KIND_FUSED else \
        ({meta["output"].get("name", FEATURES): meta["output"].get("shape")} if isinstance(meta.get("output"), dict)
         else {})
    for tap in meta.get("taps") or () if meta.get("kind") == KIND_EXTRACTOR else ():
        if isinstance(tap, dict) and isinstance(tap.get("shape"), list):
            recorded[tap.get("name")] = [None, *tap["shape"]]
    for out in outputs:  # the shape convcache recorded, where the graph leaves a size unknown
        shape = recorded.get(out["name"])
        if isinstance(shape, list) and len(shape) == len(out["shape"]):
            out["shape"] = [g if g is not None else s for g, s in zip(out["shape"], shape)]
    return {"inputs": io([i for i in proto.graph.input if i.name not in inits]), "outputs": outputs,
            "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "ir_version": proto.ir_version, "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "nodes": len(proto.graph.node), "identity": graph_sha256(load_model(path)),
            "convcache": meta}
