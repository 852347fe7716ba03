"""A store's description and health, for `convcache info` and `extract --verify`."""

from __future__ import annotations


def is_store(path: str, storage_options: dict | None = None) -> bool:
    """Whether `path` (a local path or URL) holds a Zarr store's root metadata."""
    from convcache.location import resolve

    try:
        return resolve(path, storage_options, what="info").child("zarr.json").isfile()
    except Exception:  # not a path or URL we can look into: the caller says what is wrong
        return False


def describe_store(path: str, storage_options: dict | None = None) -> dict:
    """A store's contents and health: per split its rows, copies, feature variables with their shapes and
    dtype, the extractor (identity, layer, preprocessing), the augmentation, the skipped files with reasons,
    and the result of recomputing every block digest."""
    from convcache.store.reader import FeatureStore

    fs = FeatureStore(path, storage_options)
    splits = {}
    for split in fs.splits:
        attrs, ext = fs.attrs(split), fs.extractor(split)
        damage, note = fs.verify(split)
        runs = fs.runs(split)
        splits[split] = {
            "rows": fs.rows(split), "copies": fs.copies_available(split),
            "feature_shape": list(fs.feature_shape(split)), "dtype": fs.dtype(split),
            "variables": {v: {"shape": list(fs.feature_shape(split, v)),
                              "bytes": fs.nbytes(split, dtype=fs.dtype(split), variable=v)}
                          for v in fs.variables(split)},
            "extractor": {"identity": ext.identity, "layer": ext.layer, "pooling": ext.pooling,
                          "preprocess": ext.preprocess, "precision": ext.precision, "size": ext.size,
                          "weights": ext.weights_source},
            "augment": attrs.get("augment"), "skipped": fs.skipped(split),
            "integrity": "intact" if not damage and not note else (note or "; ".join(str(d) for d in damage)),
            "extract_runs": len(runs), "rows_per_second": [round(r["rows"] / r["seconds"], 1) for r in runs
                                                            if r.get("seconds")],
            # where the rows were made: rows of two providers or math modes are not bitwise comparable
            "made_on": sorted({f"{r.get('provider', '?')} ({r.get('math') or '?'}"
                               + (f", decoded by {r['decoder']})" if r.get("decoder", "pillow") != "pillow" else ")")
                               for r in runs})}
    return {"store": str(fs.path), "format": fs.format, "classes": fs.classes, "splits": splits}


def verify_store(path: str, storage_options: dict | None = None) -> tuple[list[str], int]:
    """(one line per split and per damaged range, the number of damaged ranges): `extract --verify`."""
    from convcache.store.reader import FeatureStore

    store = FeatureStore(path, storage_options)
    lines, damaged = [], 0
    for split in store.splits:
        damage, note = store.verify(split)
        damaged += len(damage)
        lines.append(f"{split}: {store.rows(split)} committed rows, {note or ('intact' if not damage else 'DAMAGED')}")
        lines += [f"  {d}" for d in damage]
    return lines, damaged


def committed_summary(path: str, storage_options: dict | None = None) -> str:
    """What an interrupted run kept: committed rows per split."""
    from convcache.store.reader import FeatureStore

    try:
        fs = FeatureStore(path, storage_options)
        return "interrupted: " + ", ".join(f"{fs.rows(s)} rows committed in '{s}'" for s in fs.splits)
    except Exception:  # nothing committed yet (no store), or unreadable
        return "interrupted before any row was committed"
