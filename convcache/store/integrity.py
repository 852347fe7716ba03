"""Integrity of a feature store: every committed block carries a digest of its rows.

A block is the rows one commit added, [start, stop). Its digest is SHA-256 over the block's columns
as stored (features, label, image, copy, sha256 bytes, NUL-joined UTF-8 paths). The digests live in
two small arrays of the split's bookkeeping group, `block_start` and `block_sha256`, written before the commit,
so a commit covers them. `verify` recomputes every digest and checks that the blocks tile the
committed rows exactly: a deleted or altered chunk, an edited `committed_rows` or a lost digest is
named with the rows it affects, instead of training as zero rows or extracting duplicates.

What gives the rows their meaning is sealed too: each commit writes `seal`, in the same attribute
update as `committed_rows`, a SHA-256 over the split's schema (its identity attribute: extractor,
policy, seed, dtype and classes; the arrays' dtypes and the feature shape), the committed row count and
the chain of committed block digests. An edited class list, a feature `data_type` changed in the array
metadata (same bytes, same block digests) or `committed_rows` lowered to a block boundary no longer
matches the seal, and `verify` says so.

A third small array, `block_keys_sha256`, digests each block's small columns only (everything but the
features). A writer decides what is missing from those columns, so it checks them all when it opens a
split (`verify(..., contents="keys")`: a few bytes a row, whatever the feature size) and the last block
in full; the full check of every feature chunk is `--verify`'s, and every reader's for the rows it reads.
Reads go by spans of whole chunks (`spans`): a chunk is read once, however many blocks it holds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from convcache.store.layout import COLUMNS as STORE_COLUMNS
from convcache.store.layout import SCHEMA as STORE_SCHEMA
from convcache.store.layout import bookkeeping, columns, committed_rows, create_bookkeeping_array, variables

DIGEST_ARRAYS = ("block_start", "block_sha256")
KEYS_ARRAY = "block_keys_sha256"  # optional: stores written before it are checked in full by a writer
KEY_COLUMNS = tuple(n for n in STORE_COLUMNS if n != "features")


def block_digest(cols: dict, feature_dtype, names=STORE_COLUMNS) -> bytes:
    """SHA-256 over a block's columns as stored, in `names` order: the split's feature variables, then the
    coordinates (`layout.columns`; a one-output store's are `STORE_COLUMNS`)."""
    return _digest(cols, tuple(names), feature_dtype)


def keys_digest(columns: dict) -> bytes:
    """SHA-256 over a block's small columns (all but the features), serialised as `block_digest` does."""
    return _digest(columns, KEY_COLUMNS, None)


def _digest(columns: dict, names: tuple, feature_dtype) -> bytes:
    h = hashlib.sha256()
    for name in names:
        values = columns[name]
        if name == "path":
            h.update("\0".join(str(p) for p in values).encode("utf-8", "surrogatepass"))
        else:
            dtype = STORE_SCHEMA[name] if name in KEY_COLUMNS else feature_dtype
            h.update(np.ascontiguousarray(np.asarray(values).astype(dtype, copy=False)).tobytes())
    return h.digest()


def span_rows(group) -> int:
    """Rows a read span covers at least: the deepest chunk of any column, so no chunk is read twice."""
    return max(group[name].chunks[0] for name in columns(group))


def spans(bounds: list[tuple[int, int]], rows: int) -> list[list[int]]:
    """Consecutive block indices grouped into spans that end where a block ends on a multiple of `rows`
    (a chunk boundary of every column, so no chunk is read by two spans), or at 2 x `rows` rows where
    the blocks do not line up with the chunks."""
    out, current, first = [], [], 0
    for i, (a, b) in enumerate(bounds):
        if not current:
            first = a
        current.append(i)
        if b % rows == 0 or b - first >= 2 * rows:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


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
    book = bookkeeping(group, create=True)
    arrays = {"block_start": create_bookkeeping_array(book, "block_start", (0,), (4096,), "int64"),
              "block_sha256": create_bookkeeping_array(book, "block_sha256", (0, 32), (4096, 32), "uint8")}
    if covered_from == 0:  # keys digests cover every block or none: a split that gains them later has none
        arrays[KEYS_ARRAY] = create_bookkeeping_array(book, KEYS_ARRAY, (0, 32), (4096, 32), "uint8")
    group.attrs["digests_from"] = int(covered_from)
    return arrays


def digest_arrays(group) -> dict | None:
    """The split's digest arrays by name (None for a split written before block digests)."""
    book = bookkeeping(group)
    if book is None or any(name not in book for name in DIGEST_ARRAYS):
        return None
    return {name: book[name] for name in (*DIGEST_ARRAYS, KEYS_ARRAY) if name in book}


def schema_bytes(group) -> bytes:
    """What determines the meaning of a split's rows, canonically serialised (see the module's docstring)."""
    names = variables(group)
    arrays = {name: group[name] for name in [*names, *KEY_COLUMNS]}
    schema = {"identity": group.attrs.get("identity"),
              "columns": {n: str(arrays[n].dtype) for n in KEY_COLUMNS}}
    if names == ["features"]:  # a one-output store (as sealed before taps existed)
        schema["features"] = [str(arrays["features"].dtype), list(arrays["features"].shape[1:])]
    else:
        schema["variables"] = [[n, str(arrays[n].dtype), list(arrays[n].shape[1:])] for n in names]
    return json.dumps(schema, sort_keys=True, default=str).encode()


def chain_next(chain: bytes, digest: bytes) -> bytes:
    """The block-digest chain after one more committed block (it starts at 32 zero bytes)."""
    return hashlib.sha256(chain + bytes(digest)).digest()


CHAIN_START = bytes(32)


def seal(schema: bytes, committed: int, chain: bytes) -> str:
    return hashlib.sha256(schema + f"|{committed}|".encode() + chain).hexdigest()


def split_seal(group, committed: int, starts: list | None = None, digests=None) -> str:
    """The seal the split's current metadata and digests give for `committed` rows (`starts`, `digests`: the
    block starts and digests, when read already)."""
    if starts is None or digests is None:
        arrays = digest_arrays(group)
        starts, digests = arrays["block_start"][:].tolist(), arrays["block_sha256"][:]
    chain = CHAIN_START
    for digest in digests[: committed_blocks(starts, committed)]:
        chain = chain_next(chain, digest)
    return seal(schema_bytes(group), committed, chain)


def verify(group, contents: str = "all", max_copy: int | None = None,
           keep: dict | None = None) -> tuple[list[Damage], str | None]:
    """(damaged row ranges, a note when the split predates digests). The structure (shapes, block tiling,
    the seal) is always checked; then `contents`: "all" recomputes every block digest, reading every
    committed row once (with `max_copy`: only the blocks holding a copy <= max_copy); "keys" checks the
    small columns against the keys digests and the last block in full (a writer's check, see the module
    docstring; "all" where the split has no keys digests); "none" reads no rows. `keep`: column name -> [],
    filled with the (start row, values) of each span of that column read by the pass over every block (what a
    writer reads next need not be read again: `kept`)."""
    committed = committed_rows(group.attrs, f"'{group.basename}'")
    arrays = digest_arrays(group)
    if arrays is None:
        return [], "written before block digests; not verifiable"
    damage: list[Damage] = []
    try:
        shapes = {name: group[name].shape[0] for name in columns(group)}
    except Exception as exc:  # a column's metadata is missing or corrupt
        return [Damage(0, max(committed, 1), f"unreadable column metadata ({exc.__class__.__name__})")], None
    short = {n: s for n, s in shapes.items() if s < committed}
    if short:
        damage.append(Damage(min(short.values()), committed,
                             f"committed_rows is {committed} but {', '.join(sorted(short))} hold fewer rows"))
    starts = arrays["block_start"][:].tolist()
    digests = arrays["block_sha256"][:]
    covered_from = int(group.attrs.get("digests_from", 0))
    starts_ok = starts[: committed_blocks(starts, committed)]
    bounds, expected = [], covered_from
    for i, start in enumerate(starts_ok):
        stop = starts_ok[i + 1] if i + 1 < len(starts_ok) else committed
        if start != expected:
            damage.append(Damage(expected, max(start, expected + 1), "rows with no block digest"))
        expected = stop
        bounds.append((start, stop))
    if expected < committed and not short:
        damage.append(Damage(expected, committed, "rows with no block digest (committed_rows edited?)"))
    stored = group.attrs.get("seal")
    if stored is not None and not short and stored != split_seal(group, committed, starts, digests):
        damage.append(Damage(0, max(committed, 1), "the split's metadata no longer matches its seal (classes, "
                                                   "dtype, shape, extractor, policy or committed_rows edited)"))
    keys = arrays[KEYS_ARRAY][: len(bounds)] if KEYS_ARRAY in arrays else None
    if contents == "keys" and (keys is None or len(keys) < len(bounds)):
        contents = "all"
    if contents == "none" or not bounds:
        return damage, None
    limit = min(shapes.values())
    checkable = [i for i, (a, b) in enumerate(bounds) if b <= limit]  # the rest: already reported as short
    if max_copy is not None and contents == "all":
        copy = group["copy"][:limit]
        checkable = [i for i in checkable if (copy[bounds[i][0] : bounds[i][1]] <= max_copy).any()]
    last: list = []  # the last span the pass over every block read: the last block's small columns are in it
    damage += _check_blocks(group, bounds, checkable, digests, keys if contents == "keys" else None, keep, last)
    if contents == "keys" and checkable and checkable[-1] == len(bounds) - 1:  # the last block, in full
        damage += _check_blocks(group, bounds, checkable[-1:], digests, None, have=last)
    return damage, None


def _check_blocks(group, bounds, indices, digests, keys, keep: dict | None = None, have: list | None = None) \
        -> list[Damage]:
    """Recompute the digests of blocks `indices` (by the keys digests when `keys` is given), reading by spans
    (and adding the spans of the columns named in `keep` to it). `have`: [(start, stop, columns)] of a span
    read before, whose columns are not read again where they cover a span; it is left holding the last span."""
    damage = []
    names = KEY_COLUMNS if keys is not None else columns(group)
    dtype = group[variables(group)[0]].dtype
    reason = "contents differ from the block digest (a chunk was altered or deleted)"
    for span in _index_spans(bounds, indices, span_rows(group)):
        a, b = bounds[span[0]][0], bounds[span[-1]][1]
        start, stop, known = have[0] if have else (0, 0, {})
        if not (start <= a and b <= stop):
            known = {}
        try:
            cols = {name: known[name][a - start : b - start] if name in known else group[name][a:b]
                    for name in names}
        except Exception as exc:  # an unreadable (corrupt) chunk
            damage += [Damage(*bounds[i], f"unreadable chunk ({exc.__class__.__name__}: {exc})") for i in span]
            continue
        for name, spans_read in (keep or {}).items():
            if name in cols:
                spans_read.append((a, cols[name]))
        if have is not None:
            have[:] = [(a, b, cols)]
        for i in span:
            lo, hi = bounds[i][0] - a, bounds[i][1] - a
            part = {name: v[lo:hi] for name, v in cols.items()}
            ok = (keys_digest(part) == bytes(keys[i])) if keys is not None else \
                (block_digest(part, dtype, names) == bytes(digests[i]))
            if not ok:
                damage.append(Damage(*bounds[i], reason))
    return damage


def kept(keep: dict, rows: int) -> dict | None:
    """The columns `verify(..., keep=)` read, each as one array of rows 0..rows-1; None unless every column
    named was read over exactly those rows (a split from before keys digests, blocks not checked, damage)."""
    if not rows:
        return None
    out = {}
    for name, parts in keep.items():
        parts = sorted(parts, key=lambda p: p[0])
        at = 0
        for start, values in parts:
            if start != at:
                return None
            at += len(values)
        if at != rows:
            return None
        out[name] = np.concatenate([v for _, v in parts]) if len(parts) != 1 else parts[0][1]
    return out


def _index_spans(bounds, indices, rows: int) -> list[list[int]]:
    """`indices` (sorted block indices) grouped into runs of consecutive blocks of at least `rows` rows."""
    out, run = [], []
    for i in indices:
        if run and i != run[-1] + 1:
            out += [[run[j] for j in s] for s in spans([bounds[k] for k in run], rows)]
            run = []
        run.append(i)
    if run:
        out += [[run[j] for j in s] for s in spans([bounds[k] for k in run], rows)]
    return out
