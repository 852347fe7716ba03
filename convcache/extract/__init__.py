"""Extract stage: features of originals and augmented copies into a resumable Zarr cache.

Layout follows clip-retrieval: reader (what to read) -> mapper (decode, augment) -> writer (Zarr)
-> runner (the loop with inference). The store's read side, `FeatureStore`, lives in
`convcache.store` (shared by the stages that read stores); it is re-exported here for convenience.
"""

from convcache.store import FeatureStore, SplitData

__all__ = ["FeatureStore", "SplitData"]
