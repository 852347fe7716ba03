"""The augmentation presets say which Keras they mean, and match it."""

import numpy as np
import pytest
import scipy.ndimage as ndi

from convcache.augment import PRESETS, AugmentPolicy, augment, draw_params
from convcache.errors import ConvcacheError


def _photo_like(h=64, w=48, seed=0):
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.integers(0, 256, (h, w, 3)).astype(float), (2, 2, 0)).clip(0, 255).astype(np.uint8)


def _sha(c):
    return "%064x" % (c * 7919)


@pytest.mark.slow
def test_keras3_preset_matches_keras_image_data_generator():
    """keras3 = today's ImageDataGenerator.apply_transform (scipy, order 1) up to OpenCV's fixed-point
    bilinear weights: mean abs difference <= 1 grey level on 0..255."""
    from convcache.tfquiet import import_keras

    import_keras()
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    img, gen, policy = _photo_like(), ImageDataGenerator(), PRESETS["keras3"]
    h, w = img.shape[:2]
    for c in range(1, 16):
        p = draw_params(policy, 0, _sha(c), c)
        ours = augment(img, policy, 0, _sha(c), c).astype(float)
        ref = gen.apply_transform(img.astype(np.float32), {"theta": p["theta"], "tx": p["tx"] * h, "ty": p["ty"] * w,
                                                          "shear": p["shear"], "zx": p["zx"], "zy": p["zy"],
                                                          "flip_horizontal": p["flip"]})
        assert np.abs(ours - ref).mean() <= 1.0, c


def _keras_208(x, p):
    """Keras 2.0.8's random_transform/apply_transform, restated: (row, col) matrix, shear in radians,
    centre h/2 + 0.5, nearest neighbour (scipy order 0), flip after the warp."""
    h, w = x.shape[:2]
    t, s = np.pi / 180 * p["theta"], p["shear"]
    m = (np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
         @ np.array([[1, 0, p["tx"] * h], [0, 1, p["ty"] * w], [0, 0, 1]])
         @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
         @ np.array([[p["zx"], 0, 0], [0, p["zy"], 0], [0, 0, 1]]))
    ox, oy = h / 2 + 0.5, w / 2 + 0.5
    m = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]]) @ m @ np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]])
    out = np.stack([ndi.affine_transform(x[..., k], m[:2, :2], m[:2, 2], order=0, mode="nearest") for k in range(3)],
                   -1)
    return out[:, ::-1] if p["flip"] else out


def test_book_preset_matches_keras_2_0_8():
    img, policy = _photo_like(), PRESETS["book"]
    for c in range(1, 16):
        p = draw_params(policy, 0, _sha(c), c)
        np.testing.assert_array_equal(augment(img, policy, 0, _sha(c), c), _keras_208(img, p))


def test_presets_differ_where_the_versions_differ():
    book, k3 = PRESETS["book"], PRESETS["keras3"]
    assert (book.shear_units, book.interpolation, book.coordinates) == ("radians", "nearest", "rowcol")
    assert (k3.shear_units, k3.interpolation, k3.coordinates) == ("degrees", "bilinear", "xy")
    img = _photo_like()
    assert not np.array_equal(augment(img, book, 0, _sha(3), 3), augment(img, k3, 0, _sha(3), 3))


def test_policy_parsing_and_validation():
    assert AugmentPolicy.parse("book") is PRESETS["book"]
    p = AugmentPolicy.parse('{"preset": "book", "rotation_range": 20}')
    assert p.rotation_range == 20 and p.shear_units == "radians"
    for bad in ('{"rotation_range": -1}', '{"zoom_range": 1}', '{"fill_mode": "smear"}', '{"nope": 1}',
                '{"preset": "keras1"}', "[1, 2]", "not json", '{"horizontal_flip": "yes"}'):
        with pytest.raises(ConvcacheError):
            AugmentPolicy.parse(bad)


def test_many_copies_drawn_and_mapped_at_once_are_the_per_copy_ones_bitwise():
    """`draw_params_many` and `copy_matrices` (numpy's SeedSequence and PCG64 written out over arrays of keys, maps
    as stacks of 3x3 products) give every draw and every map bit for bit as `draw_params` and `copy_matrix` do:
    both presets, no flip, integer ranges, seeds past 32 bits, copies 0 and past 2**32, and hashes whose first
    128 bits have leading zero words (shorter entropy), at 1, 8, 15 and 300 keys a call."""
    import hashlib
    import random
    from dataclasses import replace

    import numpy as np

    from convcache.augment import PRESETS, AugmentPolicy, copy_matrices, copy_matrix, draw_params, draw_params_many

    rnd = random.Random(0)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(100)] + ["0" * 8 + "f" * 56, "0" * 64]
    policies = [*PRESETS.values(), replace(PRESETS["keras3"], horizontal_flip=False),
                AugmentPolicy(rotation_range=30, zoom_range=0.5, shear_range=3)]
    for policy in policies:
        for seed in (0, 7, 2**33 + 5):
            keys = [(rnd.choice(shas), rnd.choice([0, 1, 15, 2**32 + 3, rnd.randint(0, 99)])) for _ in range(300)]
            keys += [(shas[-1], 3), (shas[-2], 4)]
            many = draw_params_many(policy, seed, keys)
            for i, (sha, c) in enumerate(keys):
                one = draw_params(policy, seed, sha, c)
                assert all(one[k] == many[k][i] for k in one), (policy, seed, sha, c)
            for n in (1, 8, 15, len(keys)):
                for (sha, c), m in zip(keys[:n], copy_matrices(policy, seed, keys[:n], 150, 150)):
                    one = copy_matrix(policy, seed, sha, c, 150, 150)
                    assert (m is None) == (one is None) and (m is None or np.array_equal(m, one)), (policy, sha, c)
