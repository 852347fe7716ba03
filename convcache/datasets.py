"""What to read: a split/class folder tree, a single class-folder directory, or a CSV manifest."""

from __future__ import annotations

import csv
import os
import stat
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
    items, classes, _ = discover_all(data)
    return items, classes


def discover_all(data: str) -> tuple[list[Item], list[str], list[tuple[str, str, str]]]:
    """Items, class names, and the entries of class folders that cannot be images, each as
    (path, split, reason): directories, FIFOs, devices, sockets, broken links and symlink loops."""
    src = Path(data)
    ignored: list[tuple[str, str, str]] = []
    if not src.exists():
        raise ConvcacheError(f"--data {data}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise ConvcacheError(f"--data {data}: a file must be a CSV manifest (path,label[,split])")
        pairs = _read_manifest(src)
    else:
        split_dirs = [src / s for s in SPLITS if (src / s).is_dir()]
        folders = [(d.name, d) for d in split_dirs] if split_dirs else [("train", src)]
        pairs = []
        for split, root in folders:
            for cls in _class_dirs(root):
                for f in sorted(cls.iterdir()):
                    if f.name.startswith("."):
                        continue
                    reason = _not_a_file(f)
                    if reason:
                        ignored.append((str(f), split, reason))
                    else:
                        pairs.append((str(f), cls.name, split))
    if not pairs:
        raise ConvcacheError(f"--data {data}: no images found (expected split/class folders, class folders or a CSV)")
    classes = sorted({label for _, label, _ in pairs})
    index = {c: i for i, c in enumerate(classes)}
    items = sorted((Item(p, index[label], split) for p, label, split in pairs), key=lambda i: (i.split, i.path))
    return items, classes, ignored


def _not_a_file(path: Path) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:  # ELOOP for symlink loops, ENOENT for broken links
        return f"unreadable: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory, not an image file"
    return "not a regular file (a FIFO, device or socket)"


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_manifest(path: Path) -> list[tuple[str, str, str]]:
    """path,label[,split] rows; a UTF-8 BOM is fine; any malformed row is refused with its line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConvcacheError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the manifest as "
                             "UTF-8") from None
    reader = csv.DictReader(text.splitlines())
    rows = []
    try:
        for row in reader:
            rows.append(row)
    except csv.Error as exc:  # e.g. a field over csv's 128 KiB limit
        raise ConvcacheError(f"{path}:{len(rows) + 2}: {exc}") from None
    if not rows or not {"path", "label"} <= set(reader.fieldnames or ()):
        raise ConvcacheError(f"{path}: a manifest needs a header with path,label[,split]")
    result = []
    for n, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ConvcacheError(f"{path}:{n}: expected {len(reader.fieldnames)} fields ({', '.join(reader.fieldnames)})")
        p, label = row["path"].strip(), row["label"].strip()
        if not p or not label:
            raise ConvcacheError(f"{path}:{n}: empty {'path' if not p else 'label'}")
        split = (row.get("split") or "train").strip()
        if split not in SPLITS:
            raise ConvcacheError(f"{path}:{n}: unknown split {split!r} (use {', '.join(SPLITS)})")
        pp = Path(p)
        result.append((str(pp if pp.is_absolute() else path.parent / pp), label, split))
    return result
