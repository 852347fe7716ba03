"""Where a store or an image lives: a local path or an fsspec URL (s3://, gs://, az://, memory://, file://).

Every stage resolves its paths here, once, before any work: an unknown scheme or a scheme whose
filesystem package is missing is a one-line error naming the package, never a local folder named
`s3:`. Storage options come from the standard places (the filesystem's own: AWS_* environment
variables and ~/.aws for S3, gcloud credentials for GCS, ...), plus `AWS_ENDPOINT_URL` /
`AWS_ENDPOINT_URL_S3` for S3-compatible endpoints, plus `--storage-option key=value` for the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from convcache.errors import ConvcacheError

LOCAL = ("file", "local")


def is_url(text) -> bool:
    return "://" in str(text)


def parse_storage_options(pairs) -> dict:
    """`key=value` strings -> a dict; values are JSON where they parse (true, 3, {"a": 1}), else text."""
    options = {}
    for pair in pairs or ():
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ConvcacheError(f"--storage-option {pair!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "size") -> int:
    """'4GB', '512MiB', '1e9' -> bytes (decimal units as dask's parse_bytes reads them, binary with 'i')."""
    import re

    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    try:
        value = float(m.group(1)) * _UNITS[unit] if m else None
    except (KeyError, ValueError):
        value = None
    if value is None or not 0 < value < 2**63:  # 1e400GB is inf: no int, and no machine has it
        raise ConvcacheError(f"{what} {text}: expected a size such as 4GB, 512MiB or 1000000")
    return int(value)


def _env_options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"endpoint_url": endpoint}
    return {}


@dataclass(frozen=True)
class Location:
    """A resolved place: `protocol` and `path` as fsspec names them; `url` as the user wrote it."""

    url: str
    protocol: str
    path: str
    storage_options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def local(self) -> bool:
        return self.protocol in LOCAL

    @property
    def fs(self):
        import fsspec

        if self.local:
            return fsspec.filesystem("file")
        return fsspec.filesystem(self.protocol, **self.storage_options)

    def fresh_fs(self):
        """The filesystem with its listings cache dropped, for listing and existence checks: those must be
        current (fsspec shares one instance per options; another writer may have changed the bucket)."""
        fs = self.fs
        fs.invalidate_cache()
        return fs

    def child(self, name: str) -> Location:
        if self.local:
            return Location(str(Path(self.path) / name), "file", str(Path(self.path) / name))
        path = self.path.rstrip("/") + "/" + name
        return Location(f"{self.protocol}://{path}", self.protocol, path, self.storage_options)

    def sibling(self, suffix: str) -> Location:
        """This location's name with `suffix` appended (`x.zarr` -> `x.zarr.lock`)."""
        path = self.path.rstrip("/") + suffix
        url = path if self.local else f"{self.protocol}://{path}"
        return Location(url, self.protocol, path, self.storage_options)

    def exists(self) -> bool:
        return Path(self.path).exists() if self.local else self.fresh_fs().exists(self.path)

    def isfile(self) -> bool:
        return Path(self.path).is_file() if self.local else self.fresh_fs().isfile(self.path)

    def __str__(self) -> str:
        return self.url


def resolve(target, storage_options: dict | None = None, what: str = "path", write: bool = False) -> Location:
    """A Location for a local path or an fsspec URL, checked before any work is done: fsspec itself says
    which schemes exist and which package each needs (`fsspec.core.url_to_fs`)."""
    text = os.fspath(target) if not isinstance(target, str) else target
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not is_url(text):
        return Location(text, "file", text)
    from fsspec.core import split_protocol, url_to_fs

    scheme = (split_protocol(text)[0] or "file").lower()
    options = {**_env_options(scheme), **(storage_options or {})}
    try:
        fs, path = url_to_fs(text, **options)
    except ImportError as exc:  # fsspec names the package: "Install s3fs to access S3"
        raise ConvcacheError(f"{what} {text}: {scheme}:// needs a package that is not installed ({exc}"
                             f"{'; or pip install convcache[s3]' if scheme in ('s3', 's3a') else ''})") from None
    except ValueError as exc:  # "Protocol not known: foo"
        raise ConvcacheError(f"{what} {text}: unknown scheme '{scheme}://' (use a local path or s3://, gs://, "
                             f"az://, memory://, file://; {exc})") from None
    except Exception as exc:  # a filesystem that checks its options or credentials when it is made
        raise ConvcacheError(f"{what} {text}: cannot open ({exc.__class__.__name__}: {exc})") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in LOCAL:
        return Location(path, "file", path)
    if write and not _writable(fs):
        raise ConvcacheError(f"{what} {text}: '{scheme}://' cannot hold a store that is written to")
    if not path.strip("/"):
        raise ConvcacheError(f"{what} {text}: a URL needs a bucket/path after {scheme}://")
    return Location(text, protocol, path, options)


def _writable(fs) -> bool:
    """Whether a store can be written there: not a web server (no listing, no atomic writes), not an archive."""
    from fsspec.archive import AbstractArchiveFileSystem
    from fsspec.implementations.http import HTTPFileSystem

    return not isinstance(fs, (HTTPFileSystem, AbstractArchiveFileSystem))


def read_url(url: str, max_bytes: int, storage_options: dict | None = None) -> bytes:
    """An object's bytes through fsspec; refused before reading when larger than `max_bytes`."""
    from convcache.errors import ImageError

    loc = resolve(url, storage_options)
    fs = loc.fs
    try:
        info = fs.info(loc.path)
        if info.get("type") == "directory":
            raise ImageError("not a regular file (a directory)")
        size = info.get("size")
        if size is not None and size > max_bytes:
            raise ImageError(f"file too large: {size} bytes > {max_bytes}")
        data = fs.cat_file(loc.path, start=0, end=max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("unreadable: no such object") from None
    except Exception as exc:  # permissions, network: one bad object never stops a run
        raise ImageError(f"unreadable ({exc.__class__.__name__}: {exc})") from None
    if len(data) > max_bytes:
        raise ImageError(f"file too large: over {max_bytes} bytes")
    return data
