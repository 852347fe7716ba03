"""What to read: a split/class folder tree, a single class-folder directory, or a CSV manifest."""

from __future__ import annotations

import csv
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from convcache.errors import ConvcacheError

SPLITS = ("train", "validation", "test")
RACY_SECONDS = 2.0  # a file modified this recently gets no stat key (see convcache.store.statcache)


@dataclass(frozen=True, slots=True)
class Item:
    path: str
    label: int
    split: str
    stat: str | None = field(default=None, compare=False)  # the stat key from the listing (extract.statcache)


def discover(data: str, storage_options: dict | None = None) -> tuple[list[Item], list[str]]:
    """Items sorted by (split, path), and class names sorted into indices."""
    items, classes, _ = discover_all(data, storage_options)
    return items, classes


def discover_all(data: str, storage_options: dict | None = None, progress: bool = False
                 ) -> tuple[list[Item], list[str], list[tuple[str, str, str]]]:
    """Items, class names, and the entries of class folders that cannot be images, each as
    (path, split, reason): directories, FIFOs, devices, sockets, broken links and symlink loops.
    `data` may be a URL (s3://bucket/prefix/ or a manifest at a URL): it is listed through fsspec and
    every item's path is a full URL. Each listed file carries its stat key (`Item.stat`), from the same
    stat or listing entry that vetted it. `progress` shows a bar of the files listed."""
    from tqdm import tqdm

    from convcache.location import resolve

    loc = resolve(data, storage_options, what="--data")
    bar = tqdm(desc="list", unit="file", disable=not progress, mininterval=0.5)
    try:
        if not loc.local:
            return _discover_remote(loc, bar)
        return _discover_local(data, loc, bar)
    finally:
        bar.close()


def _discover_local(data, loc, bar):
    src = Path(loc.path)
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
                with os.scandir(cls) as entries:  # streamed; the one sort is _items' canonical order
                    for f in entries:
                        if f.name.startswith("."):
                            continue
                        path = os.path.join(cls, f.name)
                        reason, st = _not_a_file(path)
                        if reason:
                            ignored.append((path, split, reason))
                        else:
                            pairs.append((path, cls.name, split, local_key(st, time.time_ns())))
                        bar.update()
    return _items(data, pairs, ignored)


def _items(data, pairs, ignored):
    if not pairs:
        raise ConvcacheError(f"--data {data}: no images found (expected split/class folders, class folders or a CSV)")
    classes = sorted({p[1] for p in pairs})
    index = {c: i for i, c in enumerate(classes)}
    items = [Item(p[0], index[p[1]], p[2], p[3] if len(p) > 3 else None) for p in pairs]
    items.sort(key=lambda i: (i.split, i.path))
    return items, classes, ignored


def _discover_remote(loc, bar):
    """The same layouts as on disk, listed through fsspec (a bucket has prefixes, not folders)."""
    fs = loc.fresh_fs()
    base = loc.path.rstrip("/")
    try:
        if loc.path.lower().endswith(".csv") and fs.isfile(base):
            return _items(loc.url, _read_manifest(loc), [])
        if not fs.exists(base):
            raise ConvcacheError(f"--data {loc.url}: no such prefix or object")
        dirs = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["name"].rstrip("/")
                for e in fs.ls(base, detail=True) if e["type"] == "directory"}
    except ConvcacheError:
        raise
    except Exception as exc:  # credentials, network, a missing bucket
        raise ConvcacheError(f"--data {loc.url}: cannot list ({exc.__class__.__name__}: {exc})") from None
    split_dirs = [(s, dirs[s]) for s in SPLITS if s in dirs]
    folders = split_dirs or [("train", base)]
    pairs = []
    for split, root in folders:
        classes = sorted(e["name"].rstrip("/") for e in fs.ls(root, detail=True) if e["type"] == "directory"
                         and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith("."))
        for cls in classes:
            for e in sorted(fs.ls(cls, detail=True), key=lambda e: e["name"]):
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                if e["type"] == "file" and not name.startswith("."):
                    pairs.append((f"{loc.protocol}://{e['name']}", cls.rsplit("/", 1)[-1], split, remote_key(e)))
                    bar.update()
    return _items(loc.url, pairs, [])


def local_key(st: os.stat_result, now_ns: int | None = None) -> str | None:
    """A file's stat key from `os.stat`, or None when it is too recent to trust (see convcache.store.statcache)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if st.st_mtime_ns >= now_ns - int(RACY_SECONDS * 1e9):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def remote_key(entry: dict) -> str | None:
    """A listed object's stat key: size, ETag (or another content tag) and version; None without a tag."""
    tag = next((entry[k] for k in ("ETag", "etag", "md5Hash", "md5", "crc32c") if entry.get(k)), None)
    if tag is None:
        return None
    version = entry.get("VersionId") or entry.get("version_id") or entry.get("generation") or ""
    return f"{entry.get('size')}:{str(tag).strip(chr(34))}:{version}"


def _not_a_file(path) -> tuple[str | None, os.stat_result | None]:
    """(why the entry cannot be an image, or None; its stat)."""
    try:
        st = os.stat(path)
    except OSError as exc:  # ELOOP for symlink loops, ENOENT for broken links
        return f"unreadable: {exc.strerror or exc}", None
    if stat.S_ISREG(st.st_mode):
        return None, st
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not an image file", st
    return "not a regular file (a FIFO, device or socket)", st


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_manifest(path) -> list[tuple[str, str, str]]:
    """path,label[,split] rows; a UTF-8 BOM is fine; any malformed row is refused with its line. Paths
    may be URLs; relative paths are relative to the manifest (on disk or at its URL)."""
    remote = not isinstance(path, Path)  # a Location of a manifest at a URL
    raw = path.fs.cat_file(path.path) if remote else path.read_bytes()
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
            raise ConvcacheError(f"{path}:{n}: expected {len(reader.fieldnames)} fields "
                                 f"({', '.join(reader.fieldnames)})")
        p, label = row["path"].strip(), row["label"].strip()
        if not p or not label:
            raise ConvcacheError(f"{path}:{n}: empty {'path' if not p else 'label'}")
        split = (row.get("split") or "train").strip()
        if split not in SPLITS:
            raise ConvcacheError(f"{path}:{n}: unknown split {split!r} (use {', '.join(SPLITS)})")
        if "://" in p:
            result.append((p, label, split))
        elif remote:
            parent = path.url.rsplit("/", 1)[0]
            result.append((f"{parent}/{p.lstrip('/')}", label, split))
        else:
            pp = Path(p)
            result.append((str(pp if pp.is_absolute() else path.parent / pp), label, split))
    return result
