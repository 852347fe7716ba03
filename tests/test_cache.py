"""The result cache owns its memory (issue 30, section 2): bounded by bytes, entries copied out of batches."""

import tracemalloc

import numpy as np

from convcache.serve.cache import ENTRY_OVERHEAD, ResultCache


def test_the_cache_holds_its_byte_budget_under_churn_and_pins_no_batch():
    budget = 4 << 20
    cache = ResultCache(budget)
    row = 256 << 10  # 256 KiB feature rows, as in the report: 200 of them pinned 1.5 GB of batches
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for b in range(40):  # 40 batches of 32 rows: 320 MiB of batches went through
        feats = np.full((32, row // 4), b, np.float32)
        probs = np.full((32, 2), 0.5, np.float32)
        for i in range(32):
            cache.put(f"k{b}-{i}", (probs[i], feats[i]))
        del feats, probs
        now, _ = tracemalloc.get_traced_memory()
        assert now - base <= budget + (1 << 20), (b, now - base)  # the budget plus a constant
    tracemalloc.stop()
    assert cache.nbytes <= budget and len(cache) == budget // (row + 8 + ENTRY_OVERHEAD)
    probs, feats = cache.get("k39-31")
    assert feats.base is None and feats[0] == 39  # its own copy, the newest kept
    assert cache.get("k0-0") is None  # the oldest gone


def test_a_zero_budget_disables_the_cache_and_an_entry_over_budget_is_not_held():
    off = ResultCache(0)
    off.put("a", (np.zeros(2), np.zeros(10)))
    assert off.get("a") is None and len(off) == 0
    small = ResultCache(1000)
    small.put("big", (np.zeros(2), np.zeros(1000)))
    assert small.get("big") is None
