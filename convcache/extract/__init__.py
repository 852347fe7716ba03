"""Extract stage: features of originals and augmented copies into a resumable Zarr cache.

Layout follows clip-retrieval: reader (`datasets`: what to read) -> mapper (decode, augment) -> engine (plan,
blocks, executors, inference) -> the store's writer (`convcache.store`, which alone touches Zarr) -> runner
(the configuration and the run). The store's read side, `FeatureStore`, is re-exported here for convenience.
"""

from convcache.store import FeatureStore, SplitData

__all__ = ["FeatureStore", "SplitData"]
