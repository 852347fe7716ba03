"""The feature store's layout, in one place: what lives where, how it is opened and created, and how a store
written in the first layout is brought to this one.

A store is a Zarr v3 hierarchy that xarray reads as it reads any scientific dataset
(`xr.open_datatree(store, engine="zarr")`), without convcache:

    store.zarr/                      root: attributes `format`, `classes`, provenance, `writer_fence`
      train/                         one group per split; attributes: identity, seal, committed_rows, ...
        features    (row, feature_*) the data variable (float32 or float16); a tapped extractor's store has
                                     one per tap instead (block4_pool_avg (row, block4_pool_avg_0), ...)
        label       (row,)           coordinate; CF `flag_values` / `flag_meanings` name the classes
        image       (row,)           coordinate: the source image's index (copies share it)
        copy        (row,)           coordinate: 0 = the original, c = augmented copy c
        sha256      (row, sha256_byte) coordinate: the source file's content hash
        path        (row,)           coordinate: the source file
        bookkeeping/                 what is not data: block digests, skipped files, the run log
          block_start, block_sha256, block_keys_sha256   (block, ...)
          skipped_path, skipped_reason                    (skipped,)
          run_log                                         (run,)
          stat_cache/  path, key, sha256                  (entry, ...)

`features` lists the coordinates in its CF `coordinates` attribute, so `ds.where(ds["copy"] == 0, drop=True)`
selects the originals. Between commits every row column's shape equals `committed_rows` (see
`convcache.store.writer`), so a plain reader sees committed rows only.

The first layout (`convcache-features/1`) kept the bookkeeping arrays and the stat cache in the split's own
group, where xarray shows them as data. Readers read both layouts (`bookkeeping` finds either); a writer
migrates a store in place, under its lease, before it writes (`migrate`): it copies the bookkeeping into the
sub-group, then removes the originals, `block_start` first, so a kill at any point leaves one complete copy
that readers find (`moved` on the sub-group says its copies are complete); the next writer finishes the move.
"""

from __future__ import annotations

import re

from convcache.errors import ConvcacheError


def require_zarr():
    """Import zarr, outside any broad `except`: a missing `store` extra is then a ModuleNotFoundError the CLI
    names as such, never a store that reads as corrupt."""
    import zarr

    return zarr

FORMAT = "convcache-features/2"
ZARR_FORMAT = 3  # every layout's arrays and groups are zarr 3 nodes
FORMAT_V1 = "convcache-features/1"  # bookkeeping inside the split's group (read; migrated by a writer)
FORMATS = (FORMAT_V1, FORMAT)

# A split's row columns, in digest order, with their stored dtypes ("features": the extractor's output shape in
# the run's float32 or float16; "sha256": 32 bytes a row; "path": UTF-8 text). `convcache.store.integrity`
# digests exactly these columns.
SCHEMA = {"features": None, "label": "int32", "image": "int64", "copy": "int16", "sha256": "uint8", "path": str}
COLUMNS = tuple(SCHEMA)
COORDINATES = tuple(n for n in COLUMNS if n != "features")
ROW = "row"
FEATURES = "features"  # the one feature variable of a store from a one-output extractor


def variables(group) -> list[str]:
    """A split's feature variables, in digest order: one per tap of a tapped extractor (its `variables`
    attribute), else `features`."""
    names = group.attrs.get("variables")
    return list(names) if isinstance(names, list) and names else [FEATURES]


def columns(group) -> list[str]:
    """Every row column of a split, in digest order: its feature variables, then the coordinates."""
    return [*variables(group), *COORDINATES]

BOOKKEEPING = "bookkeeping"
STAT_CACHE = "stat_cache"
# the bookkeeping arrays as the first layout kept them in the split itself (block_start first: its presence
# marks a split not yet migrated)
V1_ARRAYS = ("block_start", "block_sha256", "block_keys_sha256", "skipped_path", "skipped_reason", "run_log")
_DIMS = {"block_start": ["block"], "block_sha256": ["block", "digest_byte"],
         "block_keys_sha256": ["block", "digest_byte"], "skipped_path": ["skipped"], "skipped_reason": ["skipped"],
         "run_log": ["run"], "path": ["entry"], "key": ["entry"], "sha256": ["entry", "sha256_byte"]}


def dims(name: str, ndim: int) -> list[str]:
    """The dimension names of a bookkeeping array (xarray needs every array to name its dimensions)."""
    got = _DIMS.get(name, [])
    return got if len(got) == ndim else [f"{name}_{i}" for i in range(ndim)]


def committed_rows(attrs, where: str) -> int:
    """A split's `committed_rows` attribute (absent: 0), refused in one line unless it is a row count."""
    value = attrs.get("committed_rows", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConvcacheError(f"{where}: committed_rows is {value!r}, not a row count: the store is damaged")
    return value


# ---------------------------------------------------------------- opening

def zarr_store(loc, read_only: bool = False):
    """A Zarr v3 store for a resolved location (`convcache.location`): LocalStore on disk, FsspecStore elsewhere."""
    from zarr.storage import FsspecStore, LocalStore

    if loc.local:
        return LocalStore(loc.path, read_only=read_only)
    return FsspecStore.from_url(f"{loc.protocol}://{loc.path}", storage_options=loc.storage_options or None,
                                read_only=read_only)


def open_group(store, path: str = "", mode: str = "r", consolidated: bool | None = None):
    """A group of `store` (a Zarr store object, or a group whose store to use). `consolidated=False` reads the
    group's own metadata, never the (possibly older) consolidated snapshot: what writers and checks need."""
    import zarr

    store = getattr(store, "store", store)
    # zarr 3 only (what every convcache store is): without it, zarr also looks for zarr 2's three metadata files
    # at each open, three more GETs (misses) on object storage
    return zarr.open_group(store=store, path=path or None, mode=mode, use_consolidated=consolidated,
                           zarr_format=ZARR_FORMAT)


def open_array(store, path: str, mode: str = "r+"):
    import zarr

    return writing(zarr.open_array(store=getattr(store, "store", store), path=path, mode=mode,
                                   zarr_format=ZARR_FORMAT))


def writing(arr):
    """`arr` as the writer writes it: every chunk written as given. Zarr's default compares each chunk with
    the fill value first, to leave an all-fill chunk out (it reads back the same): a full pass over a feature
    chunk, and one Python comparison a string in the text columns (2,000 paths: ~5 ms a write). Readers see
    the same values either way. `arr` itself when it is already so (a copy would not see the other's resizes)."""
    with_config = getattr(arr, "with_config", None)
    config = getattr(getattr(arr, "_async_array", None), "config", None)
    if with_config is None or getattr(config, "write_empty_chunks", False):
        return arr
    return with_config({"write_empty_chunks": True})


class CachedGroup:
    """A group whose members are opened once, for its writer's lifetime: a plain zarr group reads a member's
    metadata (one GET on object storage) every time it is named, and the writer's checks name each array
    several times (a run that found nothing new read ~140 metadata documents for a store of 22 nodes). Every
    member is one handle (arrays as `writing` gives them), so a resize through it is what the next look sees.
    Only for a store no one else writes meanwhile (the writer's, under its lock or lease), or for one look (a
    reader's check): members created through it are known to it, and names it found absent stay absent until
    it creates them."""

    def __init__(self, group):
        self._group = group
        self._members: dict = {}
        self._absent: set = set()

    def __getitem__(self, name: str):
        got = self._members.get(name)
        if got is None:
            node = self._group[name]
            got = self._members[name] = CachedGroup(node) if hasattr(node, "create_array") else writing(node)
        return got

    def __contains__(self, name: str) -> bool:
        if name in self._members:
            return True
        if name in self._absent:
            return False
        try:  # what zarr does to answer, the member kept
            self[name]
        except KeyError:
            self._absent.add(name)
            return False
        return True

    def __delitem__(self, name: str) -> None:
        del self._group[name]
        self._forget(name)

    def _forget(self, name: str) -> None:
        for key in [k for k in self._members if k == name or k.startswith(name + "/")]:
            del self._members[key]
        self._absent.clear()

    def create_group(self, name: str, **kwargs):
        self._forget(name)
        got = self._members[name] = CachedGroup(self._group.create_group(name, **kwargs))
        return got

    def create_array(self, name: str, **kwargs):
        self._forget(name)
        got = self._members[name] = writing(self._group.create_array(name, **kwargs))
        return got

    def __getattr__(self, name: str):
        return getattr(self._group, name)


def update_root_attributes(root, attributes: dict) -> None:
    """Update the root group's attributes keeping its consolidated snapshot: an update through a handle opened
    without the snapshot (as writers open the root) writes the root's metadata without it, and readers of the
    snapshot find none until the next consolidation."""
    open_group(root, mode="r+", consolidated=None).update_attributes(attributes)


def consolidate(group) -> None:
    """Refresh the root's consolidated metadata (what xarray and `FeatureStore` read first)."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec yet
        zarr.consolidate_metadata(group.store, zarr_format=ZARR_FORMAT)


def zarr_version() -> str:
    import zarr

    return zarr.__version__


def delete_dir(group, path: str) -> None:
    """Remove `path` (an array or group left half-made) under `group`'s store, whatever its metadata says."""
    import zarr

    zarr.core.sync.sync(group.store.delete_dir(path))


def contains_errors() -> tuple:
    """What creating an array or group raises when something is already there."""
    import zarr

    return zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError


# ---------------------------------------------------------------- the layout

def label_attributes(classes: list[str]) -> dict:
    """CF's way of naming the classes of an integer label: `flag_values` and blank-separated `flag_meanings`
    (a class name's own blanks become underscores)."""
    return {"long_name": "class", "flag_values": list(range(len(classes))),
            "flag_meanings": " ".join(re.sub(r"\s+", "_", str(c)) or "_" for c in classes)}


def feature_attributes(variable: str = FEATURES) -> dict:
    return {"long_name": variable, "coordinates": " ".join(COORDINATES)}


def feature_dims(variable: str, ndim: int) -> list[str]:
    """`features`: row, feature_0, ...; a tap's variable: row, block4_pool_avg_0, ... (shapes differ by tap)."""
    prefix = "feature" if variable == FEATURES else variable
    return [ROW, *(f"{prefix}_{i}" for i in range(ndim))]


def create_split(root, split: str, attributes: dict, shapes: dict, dtype: str, chunk_rows: int,
                 classes: list[str]):
    """A new, empty split with every row column (a feature variable per entry of `shapes`, name -> shape
    without the row axis, in `dtype`; all chunked `chunk_rows` deep, so a block of whole chunks is whole in
    each) and its bookkeeping group, nothing committed yet. Small columns are chunked at least 1,024 rows deep."""
    names = list(shapes)
    extra = {} if names == [FEATURES] else {"variables": names}
    group = root.create_group(split, attributes={**attributes, **extra, "committed_rows": 0})
    small = max(chunk_rows, 1024)
    for name, shape in shapes.items():
        group.create_array(name, shape=(0, *shape), chunks=(chunk_rows, *shape), dtype=dtype,
                           dimension_names=feature_dims(name, len(shape)), attributes=feature_attributes(name))
    for name, dt in SCHEMA.items():
        if name == "features":
            continue
        elif name == "sha256":
            group.create_array(name, shape=(0, 32), chunks=(small, 32), dtype=dt, dimension_names=[ROW, "sha256_byte"])
        else:
            group.create_array(name, shape=(0,), chunks=(small,), dtype=dt, dimension_names=[ROW],
                               attributes=label_attributes(classes) if name == "label" else None)
    group.create_group(BOOKKEEPING)
    return group


def bookkeeping(group, create: bool = False):
    """The split's bookkeeping group: its `bookkeeping` sub-group, or the split itself in the first layout (and
    while a migration's copies are not all made: `moved` marks them complete). None when there is none yet."""
    v1 = "block_start" in group
    if BOOKKEEPING in group and (not v1 or group[BOOKKEEPING].attrs.get("moved")):
        return group[BOOKKEEPING]
    if v1:
        return group
    if create:
        return group.create_group(BOOKKEEPING)
    return None


def create_bookkeeping_array(book, name: str, shape: tuple, chunks: tuple, dtype):
    return writing(book.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                     dimension_names=dims(name, len(shape))))


# ---------------------------------------------------------------- from the first layout

def migrate(root, classes: list[str]) -> list[str]:
    """Bring every split of a first-layout store (opened for writing, under the writer's lease) to this layout,
    then mark the root. Returns the splits moved. Rows, digests and seals are untouched: the seal covers the
    row columns and the identity, not where the bookkeeping lives."""
    moved = []
    for name in sorted(root.group_keys()):
        group = open_group(root, name, mode="r+", consolidated=False)
        if _migrate_split(group, classes):
            moved.append(name)
    root.update_attributes({"format": FORMAT})
    consolidate(root)
    return moved


def _migrate_split(group, classes: list[str]) -> bool:
    """Copy the split's bookkeeping into its sub-group (unless an earlier, killed migration finished the copies:
    `moved`), then remove the originals. Every step can be repeated."""
    old = [n for n in V1_ARRAYS if n in group]
    cache = STAT_CACHE in group
    for name, attributes in (("label", label_attributes(classes)), (FEATURES, feature_attributes())):
        if name in group:
            group[name].update_attributes(attributes)
    if not old and not cache and BOOKKEEPING in group:
        return False
    book = group[BOOKKEEPING] if BOOKKEEPING in group else group.create_group(BOOKKEEPING)
    if not book.attrs.get("moved"):
        for name in old:  # copy every array before removing any: a kill leaves the originals whole
            _copy_array(group[name], book, name)
        if cache:
            src = group[STAT_CACHE]
            dst = book[STAT_CACHE] if STAT_CACHE in book else book.create_group(STAT_CACHE)
            dst.update_attributes({"sha256": None})  # invalid until every array is copied
            for name in ("path", "key", "sha256"):
                if name in src:
                    _copy_array(src[name], dst, name)
            dst.update_attributes(dict(src.attrs))
        book.update_attributes({"moved": True})  # from here on, readers use the copies
        consolidate(group)
    for name in old:  # block_start first: its absence marks a split moved
        del group[name]
    if cache:
        del group[STAT_CACHE]
    return True


def _copy_array(src, dest, name: str) -> None:
    if name in dest:
        del dest[name]
    arr = create_bookkeeping_array(dest, name, src.shape, src.chunks, src.dtype)
    if src.shape[0]:
        arr[:] = src[:]
