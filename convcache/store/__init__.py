"""The feature store: the only package that touches Zarr.

- `layout`: what lives where (one group per split, `features` and its coordinates, the bookkeeping
  sub-group), opening and creating, and the migration of first-layout stores;
- `writer`: the root (`open_root`), one `SplitWriter` per split (the commit: seal, digests, `committed_rows`)
  and `FeatureSink`, through which every executor writes features;
- `reader`: `FeatureStore`, the read side every stage uses (only committed rows, checked against digests);
- `integrity`: block digests, the seal, `verify`;
- `lease`: one writer per store (flock on a disk, a fenced lease on object storage);
- `statcache`: the (path, stat key) -> sha256 cache a re-run reads instead of the files;
- `info`: a store's description and health (`convcache info`, `extract --verify`).

Stages import from here; none opens a Zarr group itself (`tests/test_structure.py` enforces it).
"""

from convcache.store.layout import FORMAT, committed_rows
from convcache.store.lease import writer_lock
from convcache.store.reader import FeatureStore, SplitData
from convcache.store.writer import Committed, FeatureSink, SplitSpec, SplitWriter, open_root

__all__ = ["FORMAT", "Committed", "FeatureSink", "FeatureStore", "SplitData", "SplitSpec", "SplitWriter",
           "committed_rows", "open_root", "writer_lock"]
