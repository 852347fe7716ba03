"""From thousands of photos to a million: every stage's cost that does not scale with the model.

Generates N tiny photos (32x32 JPEGs, every one distinct) in train/{a,b}/ with 1% bad files of the hostile
kinds (truncated, not an image, zero bytes), plus a fixed validation split, and runs the whole path with a
cheap real extractor (VGG16's first block with random weights at 32 px, average-pooled to 64 features:
`export --weights random --input-size 32 --layer block1_pool --pooling avg`), so that everything but the
model is what gets measured; the model's own rate is measured in the same run (bare ONNX Runtime on
batches of 64) and subtracted to give the per-row overhead. Each stage runs in a process of its own, which reports
its wall time and peak RSS (`wait4`):

    listing, hashing, planning, extract | a re-run on unchanged data | a re-run after adding 1% new files |
    extract --verify | opening the store | train --head logreg-stream --memory-budget 1GB | info STORE

and the store's metadata sizes (root and split zarr.json, the consolidated snapshot) and object count.

    .venv/bin/convcache bench scale --sizes 10000 100000 --work /tmp/scale
    .venv/bin/convcache bench scale --sizes 10000 --code /path/to/an/older/checkout   # its extract, same data

`--code` runs the stages with another checkout's `convcache` (before/after on the same data and machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PAST = 1_700_000_000  # generated files get this mtime: older than any run, so their stat keys are trusted
VALIDATION = 1000


_BASES: dict = {}


def _photo(i: int, label: int):
    """A distinct 32x32 photo: a class-dependent gradient with noise (one of 64 per class), the index
    written into its first row's pixels (distinct content, even after JPEG)."""
    import numpy as np

    key = (label, i % 64)
    if key not in _BASES:
        rng = np.random.default_rng(i % 64 + 64 * label)
        base = np.linspace(40, 200, 32, dtype=np.float32)
        img = (base[None, :, None] if label else base[:, None, None]) + rng.normal(0, 25, (32, 32, 3))
        _BASES[key] = np.clip(img, 0, 255).astype(np.uint8)
    img = _BASES[key].copy()
    img[0, :24, 0] = [(i >> b & 1) * 255 for b in range(24)]
    img[1, :8, 0] = [(i >> (24 + b) & 1) * 255 for b in range(8)]
    return img


def generate(root: Path, n: int, split: str = "train", start: int = 0, bad_every: int = 100) -> dict:
    """n files (`start` onwards) in root/split/{a,b}/; every `bad_every`-th is bad (cycling truncated, not
    an image, empty). Returns counts."""
    import io

    from PIL import Image

    for c in ("a", "b"):
        (root / split / c).mkdir(parents=True, exist_ok=True)
    bad = 0
    for i in range(start, start + n):
        label = i % 2
        path = root / split / "ab"[label] / f"{i:08d}.jpg"
        if i % bad_every == bad_every - 1:
            kind = (i // bad_every) % 3
            photo = _jpeg(_photo(i, label))
            data = b"" if kind == 2 else f"not an image {i}\n".encode() if kind == 1 else photo[: len(photo) // 2]
            bad += 1
        else:
            buf = io.BytesIO()
            Image.fromarray(_photo(i, label)).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
        path.write_bytes(data)
        os.utime(path, (PAST, PAST))
    return {"files": n, "bad": bad}


def _jpeg(img) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------- one stage, in a process of its own

def child(stage: str, args: list[str]) -> dict:
    """Run one stage in this process; what it measured (the parent adds wall time and peak RSS)."""
    if stage == "extract":
        from convcache.extract.runner import ExtractConfig, run_extract

        model, data, store = args[:3]
        extra = {"rehash": True} if "--rehash" in args else {}  # (an older checkout has no such option)
        augment = next((int(a.split("=")[1]) for a in args if a.startswith("--augment=")), 0)
        if augment:
            extra["augment"] = augment
        s = run_extract(ExtractConfig(model=model, data=data, output=store, progress=False, batch_size=64, **extra))
        return {"rows_written": s.rows_written, "rows_cached": s.rows_cached, "images": s.images,
                "skipped": len(s.skipped), "phases": {k: round(v, 2) for k, v in s.phases.items()},
                "files_hashed": getattr(s, "files_hashed", None),
                "files_from_stat_cache": getattr(s, "files_from_stat_cache", None)}
    if stage == "bare":  # the model alone, on batches of 64 random images, for ~3 s: rows/s
        import numpy as np

        from convcache.extract.engine import ExtractorSession

        session = ExtractorSession(args[0], "cpu")
        x = np.random.default_rng(0).uniform(0, 255, (64, session.contract.size, session.contract.size, 3))
        session(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3:
            session(x)
            n += 64
        return {"rows_per_second": n / (time.perf_counter() - t0)}
    if stage == "open":
        from convcache.store import FeatureStore

        fs = FeatureStore(args[0])
        out = {}
        for split in fs.splits:
            out[split] = {"rows": fs.rows(split), "copies": fs.copies_available(split),
                          "skipped": len(fs.skipped(split)) if hasattr(fs, "skipped") else
                          len(fs.attrs(split).get("skipped", {}))}
            fs.load(split, max_copy=0, with_features=False, verify=False)
        return out
    import runpy  # the stage as `python -m convcache ...` runs it (the command line sits above the benchmarks)

    sys.argv = ["convcache", *(["extract", "--verify", *args] if stage == "verify" else [stage, *args])]
    try:
        runpy.run_module("convcache", run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return {"rc": code}


def run_stage(stage: str, args: list, code: str | None = None, quiet: bool = True) -> dict:
    """`child(stage, args)` in a fresh interpreter: its result, wall seconds and peak RSS (MiB)."""
    env = dict(os.environ)  # the stage runs this checkout's convcache, or --code's
    env["PYTHONPATH"] = str(Path(code).resolve() if code else Path(__file__).resolve().parents[2])
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"convcache-scale-{os.getpid()}.json"
    cmd = [sys.executable, __file__, "_child", str(out), stage, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 3):  # 3: extract finished with skipped files
        raise RuntimeError(f"{stage} {args}: exit {proc.returncode}: {err[-2000:]}")
    result = json.loads(out.read_text()) if out.exists() else {}
    out.unlink(missing_ok=True)
    return {"stage": stage, "seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), **result}


def store_stats(store: Path) -> dict:
    files = [p for p in store.rglob("*") if p.is_file()]
    root = store / "zarr.json"
    split = store / "train" / "zarr.json"
    consolidated = json.loads(root.read_text()).get("consolidated_metadata")
    return {"objects": len(files), "bytes": sum(p.stat().st_size for p in files),
            "root_zarr_json": root.stat().st_size, "train_zarr_json": split.stat().st_size,
            "consolidated_json": len(json.dumps(consolidated)) if consolidated else 0}


def measure(n: int, work: Path, model: str, code: str | None, stages: list[str]) -> dict:
    data, store = work / f"data-{n}", work / f"store-{n}.zarr"
    result = {"n": n, "stages": {}}
    _remove_added(data, n)  # a run stopped before its clean-up
    if not data.exists():
        t0 = time.perf_counter()
        gen = generate(data, n) | {"validation": generate(data, VALIDATION, "validation", start=10**8)["files"]}
        result["generate"] = {**gen, "seconds": round(time.perf_counter() - t0, 1)}
    if store.exists():
        import shutil

        shutil.rmtree(store)
    st = result["stages"]
    st["extract"] = run_stage("extract", [model, data, store], code)
    result["store"] = store_stats(store)
    if "rerun" in stages:
        st["rerun"] = run_stage("extract", [model, data, store], code)
    if "add" in stages:
        generate(data, n // 100, start=n)  # 1% new files, 1% of them bad
        st["add"] = run_stage("extract", [model, data, store], code)
    if "verify" in stages:
        st["verify"] = run_stage("verify", ["-o", store], code)
    if "open" in stages:
        st["open"] = run_stage("open", [store], code)
    if "train" in stages:
        st["train"] = run_stage("train", ["--features", store, "--head", "logreg-stream", "--memory-budget", "1GB",
                                          "-o", work / f"head-{n}", "--quiet"], code)
    if "info" in stages:
        st["info"] = run_stage("info", [store], code)
    _remove_added(data, n)  # the data is back to N files for the next measurement on it
    return result


def _remove_added(data: Path, n: int) -> None:
    for i in range(n, n + n // 100):
        (data / "train" / "ab"[i % 2] / f"{i:08d}.jpg").unlink(missing_ok=True)


def baseline(work: Path, model: str, code: str | None) -> dict:
    """Extract on 20 photos: the process's RSS with the model loaded, to subtract from the peaks."""
    data = work / "data-base"
    if not data.exists():
        generate(data, 20, bad_every=10**9)
        generate(data, 4, "validation", start=10**8, bad_every=10**9)
    store = work / "store-base.zarr"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    return run_stage("extract", [model, data, store], code)


def copies_bench(work: Path, model: str, code: str | None, images: int = 1000, copies: int = 100) -> dict:
    """`train --copies 0` on a store holding copies 0..`copies` against the same on a store of the originals
    only (same photos): seconds and peak RSS, each train in a process of its own."""
    data = work / f"data-copies-{images}"
    if not data.exists():
        generate(data, images, bad_every=10**9)
        generate(data, images // 5, "validation", start=10**8, bad_every=10**9)
    out = {"images": images, "copies": copies}
    for tag, k in (("originals", 0), (f"{copies} copies", copies)):
        store = work / f"store-copies-{k}.zarr"
        if store.exists():
            import shutil

            shutil.rmtree(store)
        env_args = [model, data, store]
        out[tag] = {"extract": run_stage("extract", env_args + ([f"--augment={k}"] if k else []), code)}
        out[tag]["train"] = run_stage("train", ["--features", store, "--head", "logreg", "--copies", 0, "-o",
                                                work / f"head-copies-{k}", "--quiet"], code)
    return out


def table(results: list[dict], base: dict, cpu: str) -> str:
    bare = base["bare_rows_per_second"]
    lines = [f"CPU: {cpu}; model: VGG16 block1, random weights, 32 px, avg-pooled (64 features), bare "
             f"{bare:,.0f} rows/s ({1e3 / bare:.2f} ms a row); baseline extract RSS (20 photos) "
             f"{base['peak_rss_mib']} MiB", "",
             "| N (train files) | stage | seconds | files or rows /s | peak RSS MiB | notes |",
             "|---|---|---|---|---|---|"]
    for r in results:
        n, st = r["n"], r["stages"]
        ex = st["extract"]
        rows = ex.get("rows_written") or 1
        ph = ex.get("phases", {})
        for name, secs in (("listing", ph.get("list")), ("hashing", ph.get("hash")), ("planning", ph.get("plan")),
                           ("extract: run blocks", ph.get("run"))):
            if secs is not None:
                per = (n if name != "extract: run blocks" else rows) / secs if secs else float("inf")
                lines.append(f"| {n:,} | {name} | {secs:.2f} | {per:,.0f} | | |")
        over = (ex["seconds"] / rows - 1 / bare) * 1e3
        lines.append(f"| {n:,} | extract (whole process) | {ex['seconds']:.1f} | {rows / ex['seconds']:,.0f} rows | "
                     f"{ex['peak_rss_mib']} (+{ex['peak_rss_mib'] - base['peak_rss_mib']:.0f}) | "
                     f"{ex['rows_written']:,} rows, {ex['skipped']:,} skipped; overhead {over:.3f} ms a row "
                     "beyond the model |")
        for name, label in (("rerun", "re-run, unchanged data"), ("add", "re-run after +1% files"),
                            ("verify", "extract --verify"), ("open", "open the store"),
                            ("train", "train logreg-stream, 1 GB budget"), ("info", "info STORE")):
            if name in st:
                s = st[name]
                denom = n if name in ("rerun", "add") else rows
                note = ""
                if name in ("rerun", "add"):
                    note = (f"{s.get('files_hashed')} read, {s.get('files_from_stat_cache')} from the stat cache; "
                            f"{s.get('rows_written')} rows written")
                lines.append(f"| {n:,} | {label} | {s['seconds']:.1f} | {denom / s['seconds']:,.0f} | "
                             f"{s['peak_rss_mib']} | {note} |")
        m = r["store"]
        lines.append(f"| {n:,} | store metadata | | | | root zarr.json {m['root_zarr_json']:,} B (consolidated "
                     f"{m['consolidated_json']:,} B), train zarr.json {m['train_zarr_json']:,} B; {m['objects']:,} "
                     f"objects, {m['bytes'] / 2**20:,.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convcache bench scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--work", default="/tmp/convcache-scale", help="where the photos and stores go (kept)")
    p.add_argument("--code", help="run the stages with this checkout's convcache (before/after)")
    p.add_argument("--stages", nargs="+", default=["rerun", "add", "verify", "open", "train", "info"])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--copies", type=int, metavar="K",
                   help="instead: train --copies 0 on a store with copies 0..K vs one with the originals only")
    p.add_argument("--images", type=int, default=1000, help="photos for --copies")
    a = p.parse_args(argv)
    from convcache.runtime import cpu_model

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "random32-block1-avg.onnx"
    if not model.exists():
        run_stage("export", ["--weights", "random", "--input-size", "32", "--layer", "block1_pool", "--pooling",
                             "avg", "-o", model])
    if a.copies:
        out = copies_bench(work, str(model), a.code, a.images, a.copies)
        print(json.dumps(out, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps({"cpu": cpu_model(), **out}, indent=1))
        return
    base = baseline(work, str(model), a.code)
    base["bare_rows_per_second"] = run_stage("bare", [model])["rows_per_second"]
    results = []
    for n in a.sizes:
        results.append(measure(n, work, str(model), a.code, a.stages))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"cpu": cpu_model(), "baseline": base, "results": results}, indent=1))
    print(table(results, base, cpu_model()))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "_child":
    _out, _stage = Path(sys.argv[2]), sys.argv[3]
    _result = child(_stage, sys.argv[4:])
    _out.write_text(json.dumps(_result))
