"""Training matrices from a feature store: originals plus the first K augmented copies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convcache.errors import ConvcacheError
from convcache.extract import FeatureStore


@dataclass
class Split:
    X: np.ndarray  # (rows, features), flattened, float32
    y: np.ndarray


@dataclass
class TrainingData:
    train: Split
    validation: Split | None
    test: Split | None
    classes: list
    feature_shape: list
    extractor_sha256: str
    provenance: dict


def load_training_data(store_path: str, copies: int | None = None) -> TrainingData:
    store = FeatureStore(store_path)
    if "train" not in store.splits:
        raise ConvcacheError(f"{store_path}: no train split")
    shas = {store.attrs(s)["extractor"]["sha256"] for s in store.splits}
    if len(shas) > 1:
        raise ConvcacheError(f"{store_path}: splits were extracted with different extractors; refusing to mix them")
    splits = {}
    for name in ("train", "validation", "test"):
        if name not in store.splits:
            splits[name] = None
            continue
        data = store.load(name, max_copy=copies if name == "train" else 0)
        if len(data) == 0:
            raise ConvcacheError(f"{store_path}: the {name} split is empty")
        splits[name] = Split(data.features.reshape(len(data), -1).astype(np.float32, copy=False), data.labels)
    attrs = store.attrs("train")
    if len(np.unique(splits["train"].y)) < 2:
        raise ConvcacheError(f"{store_path}: the train split has fewer than two classes")
    return TrainingData(
        train=splits["train"], validation=splits["validation"], test=splits["test"], classes=store.classes,
        feature_shape=list(attrs["extractor"]["metadata"]["output"]["shape"][1:]),
        extractor_sha256=attrs["extractor"]["sha256"],
        provenance={"store": str(store.path), "extractor": attrs["extractor"]["sha256"],
                    "extractor_weights": attrs["extractor"]["metadata"].get("weights"),
                    "extractor_layer": attrs["extractor"]["metadata"].get("layer"),
                    "augment": attrs["augment"], "copies": copies},
    )
