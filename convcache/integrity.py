"""Integrity of a feature store: every committed block carries a digest of its rows.

A block is the rows one commit added, [start, stop). Its digest is SHA-256 over the block's columns
as stored (features, label, image, copy, sha256 bytes, NUL-joined UTF-8 paths). The digests live in
two small arrays of the split's group, `block_start` and `block_sha256`, written before the commit,
so a commit covers them. `verify` recomputes every digest and checks that the blocks tile the
committed rows exactly: a deleted or altered chunk, an edited `committed_rows` or a lost digest is
named with the rows it affects, instead of training as zero rows or extracting duplicates.

What gives the rows their meaning is sealed too: each commit writes `seal`, in the same attribute
update as `committed_rows`, a SHA-256 over the split's schema (its identity attribute: extractor,
policy, seed, dtype and classes; the arrays' dtypes and the feature shape), the committed row count and
the chain of committed block digests. An edited class list, a feature `data_type` changed in the array
metadata (same bytes, same block digests) or `committed_rows` lowered to a block boundary no longer
matches the seal, and `verify` says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from convcache.artifacts import STORE_COLUMNS, STORE_SCHEMA, committed_rows

DIGEST_ARRAYS = ("block_start", "block_sha256")


def block_digest(columns: dict, feature_dtype) -> bytes:
    h = hashlib.sha256()
    for name in STORE_COLUMNS:
        values = columns[name]
        if name == "path":
            h.update("\0".join(str(p) for p in values).encode("utf-8", "surrogatepass"))
        else:
            dtype = feature_dtype if name == "features" else STORE_SCHEMA[name]
            h.update(np.ascontiguousarray(np.asarray(values).astype(dtype, copy=False)).tobytes())
    return h.digest()


@dataclass
class Damage:
    start: int
    stop: int
    reason: str

    def __str__(self) -> str:
        return f"rows {self.start}..{self.stop - 1}: {self.reason}"


def committed_blocks(starts, committed: int) -> int:
    """How many leading entries of `block_start` belong to committed blocks: strictly increasing starts
    below the commit. A kill between growing the digest arrays and writing them leaves a fill value (0)
    at the end; it and anything after it are not committed blocks."""
    keep, prev = 0, -1
    for start in starts:
        if not prev < start < committed:
            break
        keep, prev = keep + 1, start
    return keep


def create_digest_arrays(group, covered_from: int) -> dict:
    """Add the digest arrays to a split (new, or written before digests); rows before `covered_from`
    stay unverifiable. Returns the arrays (a group read from consolidated metadata would not see them yet)."""
    arrays = {"block_start": group.create_array("block_start", shape=(0,), chunks=(4096,), dtype="int64",
                                                dimension_names=["block"]),
              "block_sha256": group.create_array("block_sha256", shape=(0, 32), chunks=(4096, 32), dtype="uint8",
                                                 dimension_names=["block", "digest_byte"])}
    group.attrs["digests_from"] = int(covered_from)
    return arrays


def schema_bytes(group) -> bytes:
    """What determines the meaning of a split's rows, canonically serialised (see the module's docstring)."""
    arrays = {name: group[name] for name in STORE_COLUMNS}
    return json.dumps({"identity": group.attrs.get("identity"),
                       "features": [str(arrays["features"].dtype), list(arrays["features"].shape[1:])],
                       "columns": {n: str(a.dtype) for n, a in arrays.items() if n != "features"}},
                      sort_keys=True, default=str).encode()


def chain_next(chain: bytes, digest: bytes) -> bytes:
    """The block-digest chain after one more committed block (it starts at 32 zero bytes)."""
    return hashlib.sha256(chain + bytes(digest)).digest()


CHAIN_START = bytes(32)


def seal(schema: bytes, committed: int, chain: bytes) -> str:
    return hashlib.sha256(schema + f"|{committed}|".encode() + chain).hexdigest()


def split_seal(group, committed: int) -> str:
    """The seal the split's current metadata and digests give for `committed` rows."""
    starts = group["block_start"][:].tolist()
    chain = CHAIN_START
    for digest in group["block_sha256"][: committed_blocks(starts, committed)]:
        chain = chain_next(chain, digest)
    return seal(schema_bytes(group), committed, chain)


def verify(group) -> tuple[list[Damage], str | None]:
    """(damaged row ranges, a note when the split predates digests). Reads every committed row once."""
    committed = committed_rows(group.attrs, f"'{group.basename}'")
    if any(name not in group for name in DIGEST_ARRAYS):
        return [], "written before block digests; not verifiable"
    damage: list[Damage] = []
    try:
        shapes = {name: group[name].shape[0] for name in STORE_COLUMNS}
    except Exception as exc:  # a column's metadata is missing or corrupt
        return [Damage(0, max(committed, 1), f"unreadable column metadata ({exc.__class__.__name__})")], None
    short = {n: s for n, s in shapes.items() if s < committed}
    if short:
        damage.append(Damage(min(short.values()), committed,
                             f"committed_rows is {committed} but {', '.join(sorted(short))} hold fewer rows"))
    starts = group["block_start"][:].tolist()
    digests = group["block_sha256"][:]
    covered_from = int(group.attrs.get("digests_from", 0))
    starts_ok = starts[: committed_blocks(starts, committed)]
    expected = covered_from
    for i, start in enumerate(starts_ok):
        stop = starts_ok[i + 1] if i + 1 < len(starts_ok) else committed
        if start != expected:
            damage.append(Damage(expected, max(start, expected + 1), "rows with no block digest"))
        expected = stop
        if stop > min(shapes.values()):
            continue  # already reported as short
        try:
            cols = {name: group[name][start:stop] for name in STORE_COLUMNS}
            ok = block_digest(cols, group["features"].dtype) == bytes(digests[i])
            reason = "contents differ from the block digest (a chunk was altered or deleted)"
        except Exception as exc:  # an unreadable (corrupt) chunk
            ok, reason = False, f"unreadable chunk ({exc.__class__.__name__}: {exc})"
        if not ok:
            damage.append(Damage(start, stop, reason))
    if expected < committed and not short:
        damage.append(Damage(expected, committed, "rows with no block digest (committed_rows edited?)"))
    stored = group.attrs.get("seal")
    if stored is not None and not short and stored != split_seal(group, committed):
        damage.append(Damage(0, max(committed, 1), "the split's metadata no longer matches its seal (classes, "
                                                   "dtype, shape, extractor, policy or committed_rows edited)"))
    return damage, None
