"""What to read: a split/class folder tree, a single class-folder directory, or a CSV manifest."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from convcache.errors import ConvcacheError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Item:
    path: str
    label: int
    split: str


def discover(data: str) -> tuple[list[Item], list[str]]:
    """Items sorted by (split, path), and class names sorted into indices."""
    src = Path(data)
    if not src.exists():
        raise ConvcacheError(f"--data {data}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise ConvcacheError(f"--data {data}: a file must be a CSV manifest (path,label[,split])")
        pairs = _read_manifest(src)
    else:
        split_dirs = [src / s for s in SPLITS if (src / s).is_dir()]
        folders = [(d.name, d) for d in split_dirs] if split_dirs else [("train", src)]
        pairs = [(str(f), cls.name, split) for split, root in folders for cls in _class_dirs(root)
                 for f in sorted(cls.iterdir()) if f.is_file() and not f.name.startswith(".")]
    if not pairs:
        raise ConvcacheError(f"--data {data}: no images found (expected split/class folders, class folders or a CSV)")
    classes = sorted({label for _, label, _ in pairs})
    index = {c: i for i, c in enumerate(classes)}
    items = sorted((Item(p, index[label], split) for p, label, split in pairs), key=lambda i: (i.split, i.path))
    return items, classes


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_manifest(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ConvcacheError(f"{path}: a manifest needs a header with path,label[,split]")
    out = []
    for n, row in enumerate(rows, start=2):
        split = (row.get("split") or "train").strip()
        if split not in SPLITS:
            raise ConvcacheError(f"{path}:{n}: unknown split {split!r} (use {', '.join(SPLITS)})")
        p = Path(row["path"].strip())
        out.append((str(p if p.is_absolute() else path.parent / p), row["label"].strip(), split))
    return out
