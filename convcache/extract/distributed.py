"""extract on a Dask cluster: the engine's `DaskExecutor` (convcache.extract.engine has the rest). The
client plans and commits; the workers decode, augment, infer and write whole feature chunks.

1. The client lists the images and opens the store (its SplitWriter truncates whatever a killed run
   left past `committed_rows`, and knows which (sha256, copy) rows are committed).
2. Probe tasks on the workers hash every file and decode it once, so the plan knows which files are
   usable *before* rows are assigned (a task fills whole chunks; a row cannot go missing later).
3. The client plans the missing rows in the single-process order (same image indices), grows the
   columns to hold them, and cuts the rows into tasks at chunk boundaries: no two tasks write the
   same chunk. The model reaches every worker, present and future, in a `WorkerPlugin` that opens one
   session per worker (CUDA where the worker has a GPU, as in the single-process path): a task depends
   on no scattered data, so a lost worker loses nothing another worker needs.
4. Each task writes its feature chunks and returns the block's digest (over every column). The
   client commits blocks strictly in row order, as each contiguous prefix finishes: small columns,
   digest, then `committed_rows`. A lost worker's tasks are rerun by the scheduler (they rewrite the
   same chunks with the same bytes); a killed client leaves a committed prefix that a re-run extends.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from contextlib import contextmanager

from convcache.datasets import Item
from convcache.errors import ConvcacheError
from convcache.extract.engine import Block, BlockFailure, BlockSettings, Planned, copy_major, run_block
from convcache.extract.mapper import Hashed

log = logging.getLogger(__name__)

PROBE_BATCH = 64  # files per probe task
CONSOLIDATE_SECONDS = 5.0  # the client refreshes the consolidated snapshot at most this often (and at the end)


def parse_cluster(spec: str) -> int:
    """`local:N` -> N worker processes."""
    kind, _, n = str(spec).partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise ConvcacheError(f"--cluster {spec}: expected local:N (N worker processes), e.g. local:2")
    return int(n)


@contextmanager
def dask_client(scheduler: str | None, cluster: str | None, threads: int | None = None):
    """A distributed.Client on an existing scheduler, or on a LocalCluster started for this run."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConvcacheError("distributed extraction needs dask.distributed: pip install 'convcache[dist]'") from None
    if scheduler and cluster:
        raise ConvcacheError("--scheduler and --cluster are exclusive: connect to a cluster or start a local one")
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # dask logs its start-up at INFO: shown with -v only
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if cluster:
        n = parse_cluster(cluster)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR) as lc, Client(lc) as client:
            yield client
        return
    try:
        client = Client(scheduler)  # waits distributed.comm.timeouts.connect (dask config; default 30 s)
    except Exception as exc:  # OSError / TimeoutError: nothing listens there
        raise ConvcacheError(f"--scheduler {scheduler}: cannot connect ({exc.__class__.__name__}: {exc})") from None
    try:
        yield client
    finally:
        client.close()


# ---------------------------------------------------------------- on the workers

def probe_files(items: list[Item], size: int, max_pixels: int, max_bytes: int, storage_options: dict) -> list:
    from convcache.extract.mapper import probe_file

    return [probe_file(item, size, max_pixels, max_bytes, storage_options) for item in items]


class SessionPlugin:
    """A `WorkerPlugin`: the extractor's bytes, and one inference session per worker opened in `setup`.
    The scheduler hands it to every worker that joins later, so a replacement worker can run any task."""

    def __init__(self, model: bytes, identity: str, device: str, threads: int | None):
        self.model, self.device, self.threads = model, device, threads
        self.name = f"convcache-extractor-{identity[:16]}-{device}-{threads}"
        self.session = None

    def setup(self, worker) -> None:
        from convcache.runtime import create_session

        self.session = create_session(self.model, self.device, self.threads)

    def teardown(self, worker) -> None:
        self.session = None


def worker_provider(plugin_name: str, dask_worker=None) -> str:
    """This worker's session provider (run on every worker by `Client.run`)."""
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker is not None else None
    return plugin.session.get_providers()[0] if plugin is not None and plugin.session is not None else ""


def run_block_task(plugin_name: str, block: Block, settings: BlockSettings):
    """A task: one block on this worker's session (the plugin's)."""
    from dask.distributed import get_worker

    return run_block(get_worker().plugins[plugin_name].session, block, settings)


# ---------------------------------------------------------------- on the client

class DaskExecutor:
    """The engine's executor on a Dask cluster: probes in batches of files, one task per block."""

    def __init__(self, client, model: bytes, contract, device: str, threads: int | None, cfg):
        from dask.distributed import WorkerPlugin

        self.client, self.cfg, self.size = client, cfg, contract.size
        self.provider = "dask"
        plugin = type("ConvcacheSessionPlugin", (SessionPlugin, WorkerPlugin), {})(model, contract.identity, device,
                                                                               threads)
        client.register_plugin(plugin, name=plugin.name)
        self.plugin_name = plugin.name
        try:  # what the workers' sessions run on: a resume on another provider is refused (engine.check_device)
            got = client.run(worker_provider, plugin.name)
            self.provider = ", ".join(sorted({v for v in got.values() if v})) or "dask"
        except Exception:  # a worker without the plugin yet: the blocks' results name the provider later
            pass
        self._decode_errors: dict = {}
        self._probed: set = set()
        self.tasks = 0

    def preflight(self, items: list[Item], cfg) -> None:
        """Before anything is created: one real read of the first image on a worker. When this process can
        read it and the worker cannot, the workers lack this process's storage environment (credentials,
        endpoint): every image would become a skipped file. Stop with one line instead."""
        from convcache.extract.mapper import hash_file

        if not items:
            return
        here = hash_file(items[0], cfg.max_bytes, cfg.storage_options)
        there = self.client.submit(hash_file, items[0], cfg.max_bytes, cfg.storage_options, pure=False).result()
        if here.error is None and there.error is not None:
            raise ConvcacheError(f"the Dask workers cannot read {items[0].path} ({there.error}), which this process "
                                 "reads: give the workers the storage environment (credentials such as "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, or --storage-option) "
                                 "that this process has. Nothing was created or changed.")

    def ready(self) -> None:
        """Nothing to wait for: each worker starts its own runtime with its first task (`SessionPlugin`)."""

    def describe(self) -> dict:
        return {"workers": len(self.client.scheduler_info().get("workers", {})),
                "scheduler": self.client.scheduler.address, "tasks": self.tasks}

    def block_rows(self, writer) -> int:
        per = self.cfg.rows_per_task or writer.chunk_rows
        return max(1, -(-per // writer.chunk_rows)) * writer.chunk_rows

    def reserve(self, writer, rows: int) -> None:
        """Workers write feature chunks in place: grow every column first (`SplitWriter.reserve`)."""
        writer.reserve(rows)
        writer.consolidate_seconds = max(writer.consolidate_seconds, CONSOLIDATE_SECONDS)

    def hash_files(self, items: list[Item], cfg, bar=None, early=None) -> list[Hashed]:
        """Hash and decode every file on the workers, so that the plan holds only files that decode (`early`,
        decoding on this machine as files are hashed, is the local executor's)."""
        hashed = self._probe(items, cfg, bar)
        self._probed = {h.item.path for h in hashed}
        self._decode_errors = {h.item.path: h.decode_error for h in hashed if h.decode_error}
        return hashed

    def _probe(self, items: list[Item], cfg, bar=None) -> list[Hashed]:
        from dask.distributed import as_completed

        batches = [items[i : i + PROBE_BATCH] for i in range(0, len(items), PROBE_BATCH)]
        probe = self.client.map(probe_files, batches, size=self.size, max_pixels=cfg.max_pixels,
                                max_bytes=cfg.max_bytes, storage_options=cfg.storage_options, pure=False)
        if bar is not None:
            sizes = {fut.key: len(batch) for fut, batch in zip(probe, batches)}
            for fut in as_completed(probe):
                bar.update(sizes[fut.key])
        return [h for part in self.client.gather(probe) for h in part]

    def usable(self, plan: list[Planned], writer, settings: BlockSettings):
        """The planned (image, copy) rows, copy by copy, of the files that decode. Files hashed from the
        stat cache were not probed: they are probed (decoded on the workers) now, before any is planned."""
        unprobed = [p.item for p in plan if p.item.path not in getattr(self, "_probed", set())]
        if unprobed:
            for h in self._probe(unprobed, self.cfg):
                if h.error or h.decode_error:
                    self._decode_errors[h.item.path] = h.error or h.decode_error
        reported = set()
        for p, c in copy_major(plan):
            if p.item.path in self._decode_errors:
                if p.item.path not in reported:
                    writer.skip(p.item.path, self._decode_errors[p.item.path])
                    reported.add(p.item.path)
            else:
                yield Planned(p.item, p.sha256, (c,), image=p.image)

    def run(self, blocks, settings: BlockSettings, writer):
        """Submit blocks with a bounded number in flight; yield the finished ones in batches (as
        `as_completed` gathers them). After a failure (past the scheduler's retries) nothing more is
        submitted: no row past it could commit in this run."""
        from dask.distributed import as_completed

        workers = self.client.scheduler_info().get("workers", {}).values()
        window = max(8, 4 * sum(w.get("nthreads", 1) for w in workers))
        starts = {}

        def submit(n):
            out = []
            for block in itertools.islice(blocks, n):
                fut = self.client.submit(run_block_task, self.plugin_name, block, settings, pure=False, retries=2)
                starts[fut.key] = block.start
                out.append(fut)
            self.tasks += len(out)
            return out

        running, failed = as_completed(submit(window)), False
        for batch in running.batches():
            results = []
            for fut in batch:
                try:
                    results.append(fut.result())
                except Exception as exc:
                    results.append(BlockFailure(starts[fut.key], f"{exc}"))
                    failed = True
            yield results
            if not failed:
                for fut in submit(len(batch)):
                    running.add(fut)


@contextmanager
def dask_executor(cfg, model: bytes, contract):
    """A DaskExecutor on the configured cluster (`--scheduler`, or a LocalCluster for `--cluster local:N`)."""
    # local:N shares this machine's cores between N workers; a remote worker uses its own machine
    threads = cfg.threads or (max(1, (os.cpu_count() or 1) // parse_cluster(cfg.cluster)) if cfg.cluster else None)
    with dask_client(cfg.scheduler, cfg.cluster) as client:
        if cfg.progress:
            print(f"dask: {len(client.scheduler_info().get('workers', {}))} workers, dashboard "
                  f"{client.dashboard_link}", file=sys.stderr)
        yield DaskExecutor(client, model, contract, cfg.device, threads, cfg)
