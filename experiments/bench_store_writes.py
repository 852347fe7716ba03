"""What the store costs a run, apart from its rows: three null-device extracts (no inference) with the convcache of
the checkout it runs in (PYTHONPATH=., checked), on a local store and, with --s3, on a loopback S3 endpoint
(moto's server, as the tests use): a first run into a new store, a re-run that finds nothing new, and a re-run
after `--add` photos arrived. For each: seconds, and the store's requests by kind (zarr store `set`, `get`,
`delete` and listing calls, metadata documents and chunks apart); then what a training job asks of it (open it
and load the split with `FeatureStore`). Run from two checkouts in turn for an
interleaved A/B across commits, as docs/benchmarks.md does ("What a run writes"):

    git worktree add /tmp/before <commit>
    for r in 1 2 3; do for dir in /tmp/before .; do
      (cd $dir && PYTHONPATH=. /path/to/.venv/bin/python /path/to/experiments/bench_store_writes.py \\
         --model /path/to/runs/ext.onnx --images 2000 --s3 --work /tmp/sw); done; done
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def counting() -> collections.Counter:
    """Count every request zarr makes of its stores from here on (by kind: metadata document or chunk)."""
    from zarr.abc.store import Store
    from zarr.storage import FsspecStore, LocalStore

    counts: collections.Counter = collections.Counter()

    def wrap(cls, name):
        original = getattr(cls, name)

        async def counted(self, key, *args, **kwargs):
            what = "metadata" if str(key).endswith("zarr.json") else "chunk"
            counts[f"{name} {what}"] += 1
            return await original(self, key, *args, **kwargs)

        setattr(cls, name, counted)

    def wrap_listing(cls, name):
        original = getattr(cls, name)

        def counted(self, *args, **kwargs):
            counts["list"] += 1
            return original(self, *args, **kwargs)

        setattr(cls, name, counted)

    for cls in (LocalStore, FsspecStore):
        for name in ("set", "get", "delete"):
            wrap(cls, name)
        for name in ("list_dir", "list_prefix"):
            if name in cls.__dict__ or hasattr(Store, name):
                wrap_listing(cls, name)
    return counts


def moto_endpoint() -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="store-writes")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an extractor (its output shape is all the null device uses)")
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--add", type=int, default=10, help="photos that arrive before the third run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--s3", action="store_true", help="also on a loopback S3 endpoint (moto's server)")
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the photo subsets and local stores go")
    a = p.parse_args(argv)
    import convcache

    here = Path(convcache.__file__).resolve().parent.parent
    if here != Path(os.getcwd()).resolve() and (Path(os.getcwd()) / "convcache").is_dir():
        raise SystemExit(f"bench_store_writes.py: convcache is imported from {here}, not from this checkout "
                         f"({os.getcwd()}); run it with PYTHONPATH=.")
    from convcache.benchmarks.extract import subset
    from convcache.extract.runner import ExtractConfig, run_extract
    from convcache.runtime import cpu_model

    work = Path(a.work)
    pool = work / f"pool-{a.images + a.add}"
    if not pool.exists():
        work.mkdir(parents=True, exist_ok=True)
        subset(a.data, a.images + a.add, pool)
    files = sorted(pool.rglob("*.jpg"))
    if len(files) < a.images + a.add:
        raise SystemExit(f"bench_store_writes.py: --data has {len(files)} photos, fewer than --images + --add")
    run_dir = Path(tempfile.mkdtemp(dir=work))
    data = run_dir / "data"
    # links to the photos (their stat keys are the photos' own, old: re-runs read them from the stat cache); the
    # first runs see all but `add` of them, which arrive before the third
    for f in files[: a.images]:
        (data / f.relative_to(pool)).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), data / f.relative_to(pool))
    outs = {"local": str(run_dir / "s.zarr")}
    if a.s3:
        moto_endpoint()
        outs["s3"] = f"s3://store-writes/{run_dir.name}/s.zarr"
    counts = counting()
    result = {"convcache": str(here), "cpu": cpu_model(), "images": a.images, "added": a.add}
    cfg = {k: ExtractConfig(model=str(Path(a.model).resolve()), data=str(data), output=out, progress=False,
                            device="null", workers=a.workers) for k, out in outs.items()}
    run_extract(ExtractConfig(model=str(Path(a.model).resolve()), data=str(data), output=str(run_dir / "warm.zarr"),
                              progress=False, device="null", workers=a.workers))  # imports and first calls
    for phase in ("first run", "nothing new", f"{a.add} photos added"):
        if phase.endswith("added"):
            for f in files[a.images:]:
                (data / f.relative_to(pool)).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(f.resolve(), data / f.relative_to(pool))
        for where, c in cfg.items():
            counts.clear()
            t = time.perf_counter()
            s = run_extract(c)
            result[f"{where}, {phase}"] = {"seconds": round(time.perf_counter() - t, 3), "rows": s.rows_written,
                                           **dict(sorted(counts.items()))}
    from convcache.store import FeatureStore

    for where, c in cfg.items():  # what a training job then asks of the store: open it and read the split
        counts.clear()
        t = time.perf_counter()
        rows = len(FeatureStore(c.output, dict(c.storage_options)).load("train"))
        result[f"{where}, read for training"] = {"seconds": round(time.perf_counter() - t, 3), "rows": rows,
                                                 **dict(sorted(counts.items()))}
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
