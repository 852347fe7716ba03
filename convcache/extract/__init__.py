"""Extract stage: features of originals and augmented copies into a resumable Zarr cache.

Layout follows clip-retrieval: reader (what to read) -> mapper (decode, augment) -> writer (Zarr)
-> runner (the loop with inference). `FeatureStore` is the public read API other stages use.
"""

from convcache.extract.store import FeatureStore, SplitData

__all__ = ["FeatureStore", "SplitData"]
