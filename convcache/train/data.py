"""Training matrices from a feature store: originals plus the first K augmented copies, with each
row's canonical image rank and copy (for the replay schedule), and validation split into the
protocol's select and report halves."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from convcache.errors import ConvcacheError
from convcache.protocol import canonical_images, validation_halves
from convcache.store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class Split:
    X: np.ndarray  # (rows, features), flattened, float32
    y: np.ndarray
    image: np.ndarray | None = None  # canonical image rank (ascending sha256) within the split
    copy: np.ndarray | None = None
    sha256: list | None = None
    row: np.ndarray | None = None  # position in the store's split (to read features lazily)

    def take(self, idx) -> Split:
        return Split(self.X[idx], self.y[idx], None if self.image is None else self.image[idx],
                     None if self.copy is None else self.copy[idx],
                     None if self.sha256 is None else [self.sha256[i] for i in idx],
                     None if self.row is None else self.row[idx])


@dataclass
class TrainingData:
    train: Split
    validation: Split | None  # all of it
    select: Split | None  # the half that selects (C, epoch, early stopping)
    report: Split | None  # the half that is reported
    test: Split | None
    classes: list
    feature_shape: list
    extractor_sha256: str
    provenance: dict
    copies_available: int
    copies_used: int
    extractor_opset: int = 17

    def with_copies(self, k: int) -> TrainingData:
        """The same data restricted to train copies 0..k (k no larger than what was loaded)."""
        from dataclasses import replace

        if k > self.copies_used:
            raise ConvcacheError(f"copies 0..{k} asked of data loaded with copies 0..{self.copies_used}")
        keep = np.flatnonzero(self.train.copy <= k)
        return replace(self, train=self.train.take(keep), copies_used=int(self.train.copy[keep].max()),
                       provenance={**self.provenance, "copies": int(self.train.copy[keep].max())})


def current_listing(store: FeatureStore, where, storage_options: dict | None = None) -> dict:
    """Train on the data as it is *now* (issue 30): the data the store was extracted from is listed again
    (only files whose stat changed are read), photos moved to another class take that class's label, deleted
    ones are left out; photos not extracted yet are an error naming the command that adds them. Returns each
    split's listing digest (what the head is recorded as trained on); {} for a store older than listings."""
    changed = store.relist(storage_options)
    if changed and any(changed.values()):
        log.warning("%s: the data changed since it was extracted (%s): training on it as it is now", where,
                    "; ".join(f"{split} {c}" for split, c in changed.items() if c))
    for split in store.splits:
        st = store.status(split)
        if st["unextracted"]:
            store.check(split, contents="keys")  # a damaged key column reads as missing photos: name the damage
            raise ConvcacheError(f"{where}: {st['unextracted']} photo(s) of '{split}' are in the data but not in the "
                                 "store; run `convcache extract` (it adds only them), then train")
    return {split: store.listing(split).digest for split in store.splits if store.listing(split) is not None}


def load_training_data(store_path, copies: int | None = None, storage_options: dict | None = None,
                       train_features: bool = True) -> TrainingData:
    """`train_features=False` loads every column of train but its features (a streaming head reads
    those block by block from the store, verifying each block as it reads it)."""
    store = store_path if isinstance(store_path, FeatureStore) else FeatureStore(store_path, storage_options)
    if "train" not in store.splits:
        raise ConvcacheError(f"{store_path}: no train split")
    shas = {store.extractor_identity(s) for s in store.splits}
    if len(shas) > 1:
        raise ConvcacheError(f"{store_path}: splits were extracted with different extractors; refusing to mix them")
    if copies is not None and copies < 0:
        raise ConvcacheError(f"--copies {copies}: must be >= 0")
    listing = current_listing(store, store_path, storage_options)
    splits = {}
    available = 0
    for name in ("train", "validation", "test"):
        if name not in store.splits:
            splits[name] = None
            continue
        lazy = name == "train" and not train_features
        data = store.load(name, max_copy=copies if name == "train" else 0, with_features=not lazy, verify=not lazy)
        if len(data) == 0:
            raise ConvcacheError(f"{store_path}: the {name} split is empty")
        _, rank = canonical_images(data.sha256)
        split = Split(data.features.reshape(len(data), -1).astype(np.float32, copy=False), data.labels,
                      rank, data.copy.astype(np.int64), data.sha256, data.row)
        # evaluation splits in canonical order (ascending sha256), as the reference holds them
        splits[name] = split if name == "train" else split.take(np.lexsort((split.copy, split.image)))
        if name == "train":
            available = int(data.copy.max())
    stored = store.copies_available("train")
    if copies is not None and copies > stored:
        log.warning("--copies %d: the store holds copies 0..%d of train; using those", copies, stored)
    ext = store.extractor("train")
    if len(np.unique(splits["train"].y)) < 2:
        raise ConvcacheError(f"{store_path}: the train split has fewer than two classes")
    select = report = None
    if splits["validation"] is not None:
        v = splits["validation"]
        sel, rep = validation_halves(v.sha256, v.y)
        select, report = v.take(sel), v.take(rep)
    return TrainingData(
        train=splits["train"], validation=splits["validation"], select=select, report=report, test=splits["test"],
        classes=store.classes, feature_shape=list(store.feature_shape("train")),
        extractor_sha256=ext.identity, extractor_opset=ext.opset,
        provenance={"store": str(store.path), "extractor": ext.identity,
                    "extractor_weights": ext.metadata.get("weights"), "extractor_layer": ext.layer,
                    "augment": store.augmentation("train"), "copies": available, "listing": listing},
        copies_available=stored, copies_used=available,
    )
