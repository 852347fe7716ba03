"""Deterministic offline augmentation, shared by extract and the TensorFlow reference trainer.

The policy is Chollet's ImageDataGenerator settings (DLwP sec. 5.3). Each augmented copy is one
composed affine warp (rotation, shift, shear, zoom, flip) done by OpenCV with edge replication,
which is Keras' fill_mode='nearest'. The parameters of copy c of an image come from a generator
seeded by (seed, the image's content hash, c), so a copy is the same whatever the batch size,
worker count, file order or interruption.

Two presets say which Keras they mean (the same numbers read differently by different versions):

- `keras3` (the default): today's `ImageDataGenerator` - shear in degrees, bilinear interpolation
  (`interpolation_order=1`), transforms centred at ((h-1)/2, (w-1)/2), the matrix applied to (x, y).
- `book`: Keras 2.0.8, the version the book ran - shear in radians (0.2 rad = 11.5 degrees),
  nearest-neighbour interpolation (`order=0`), centred at (h/2+0.5, w/2+0.5), the matrix applied to
  (row, col).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from convcache.errors import ConvcacheError

FILL_MODES = ("nearest", "reflect", "constant", "wrap")
SHEAR_UNITS = ("degrees", "radians")
INTERPOLATIONS = ("bilinear", "nearest")
COORDINATES = ("xy", "rowcol")


@dataclass(frozen=True)
class AugmentPolicy:
    rotation_range: float = 40.0  # degrees, uniform in [-r, r]
    width_shift_range: float = 0.2  # fraction of the width
    height_shift_range: float = 0.2  # fraction of the height
    shear_range: float = 0.2  # in `shear_units`, uniform in [-s, s]
    zoom_range: float = 0.2  # zx and zy drawn independently in [1 - z, 1 + z]
    horizontal_flip: bool = True
    fill_mode: str = "nearest"
    shear_units: str = "degrees"  # Keras >= 2.2 reads shear_range in degrees; 2.0.8 (the book) in radians
    interpolation: str = "bilinear"  # Keras 3: interpolation_order=1; 2.0.8: order=0 (nearest)
    center_offset: float = -0.5  # transforms are centred at size/2 + offset: -0.5 today, +0.5 in Keras 2.0.8
    coordinates: str = "xy"  # the matrix acts on (x, y) since keras-preprocessing 1.1 (Keras 3); on (row, col) in 2.0.8

    def __post_init__(self):
        for name in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range",
                     "center_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConvcacheError(f"policy: {name} must be a finite number, got {value!r}")
            if name != "center_offset" and value < 0:
                raise ConvcacheError(f"policy: {name} must be >= 0, got {value!r}")
        if self.zoom_range >= 1:
            raise ConvcacheError(f"policy: zoom_range must be < 1, got {self.zoom_range!r}")
        if not isinstance(self.horizontal_flip, bool):
            raise ConvcacheError(f"policy: horizontal_flip must be true or false, got {self.horizontal_flip!r}")
        for name, allowed in (("fill_mode", FILL_MODES), ("shear_units", SHEAR_UNITS),
                              ("interpolation", INTERPOLATIONS), ("coordinates", COORDINATES)):
            if getattr(self, name) not in allowed:
                raise ConvcacheError(f"policy: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str | dict | None) -> AugmentPolicy:
        """A preset name (`keras3`, `book`), a JSON object (a string or a file) of overrides, or a dict.
        A `"preset"` key in the JSON picks the base the other keys override (default `keras3`)."""
        if text is None or text == "":
            return PRESETS["keras3"]
        if isinstance(text, str) and text in PRESETS:
            return PRESETS[text]
        raw = text
        if isinstance(text, str):
            try:
                raw = json.loads(Path(text).read_text() if Path(text).is_file() else text)
            except (OSError, ValueError) as exc:
                raise ConvcacheError(f"--policy: not a preset ({', '.join(PRESETS)}) nor a JSON object: "
                                     f"{exc}") from None
        if not isinstance(raw, dict):
            raise ConvcacheError(f"--policy: expected a preset name or a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        base = raw.pop("preset", "keras3")
        if base not in PRESETS:
            raise ConvcacheError(f"--policy: unknown preset {base!r}; choose {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConvcacheError(f"--policy: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(PRESETS[base], **raw)


PRESETS = {
    "keras3": AugmentPolicy(),
    "book": AugmentPolicy(shear_units="radians", interpolation="nearest", center_offset=0.5, coordinates="rowcol"),
}


@functools.cache
def _cv2_tables() -> tuple:
    """(cv2, border modes, interpolations), built on the first warp: OpenCV is imported by the warp only (the
    `extract` extra); the CLI's parsers and the serving side import this module without it."""
    import cv2

    borders = {"nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT, "constant": cv2.BORDER_CONSTANT,
               "wrap": cv2.BORDER_WRAP}
    return cv2, borders, {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def draw_params(policy: AugmentPolicy, seed: int, image_sha256: str, copy: int) -> dict:
    """Warp parameters of one copy, from a generator keyed by (seed, content hash, copy)."""
    rng = np.random.default_rng([seed, int(image_sha256[:32], 16), copy])
    u = rng.uniform
    zx, zy = u(1 - policy.zoom_range, 1 + policy.zoom_range, size=2)
    return {
        "theta": u(-policy.rotation_range, policy.rotation_range),
        "tx": u(-policy.height_shift_range, policy.height_shift_range),
        "ty": u(-policy.width_shift_range, policy.width_shift_range),
        "shear": u(-policy.shear_range, policy.shear_range),
        "zx": zx,
        "zy": zy,
        "flip": bool(policy.horizontal_flip and u() < 0.5),
    }


# ---------------------------------------------------------------- many copies at once
# `draw_params` costs ~40 µs a copy, nearly all of it building a generator (SeedSequence, PCG64, Generator) to
# draw 7 numbers; `inverse_matrix` ~30 µs more in 3x3 numpy calls. Below, the same numbers for many (image, copy)
# keys at once: numpy's SeedSequence and PCG64 (XSL-RR 128/64) written out over arrays of keys, then every map
# composed as stacks of 3x3 matrices. Bitwise the scalar path's (tests/test_augment.py checks draws and maps
# against it over presets, seeds and keys); the scalar path stays the definition.

_M32 = 0xFFFFFFFF
_SS_INIT_A, _SS_MULT_A, _SS_INIT_B, _SS_MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_SS_MIX_L, _SS_MIX_R, _SS_POOL = 0xCA01F9DD, 0x4973F715, 4
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341
_U64 = np.uint64


def _words(n: int) -> list[int]:
    """An int as SeedSequence takes it: 32-bit words, least significant first ([0] for 0)."""
    out = []
    while True:
        out.append(n & _M32)
        n >>= 32
        if not n:
            return out


def _consts(count: int, init: int, mult: int) -> list[int]:
    out, h = [], init
    for _ in range(count):
        out.append(h)
        h = (h * mult) & _M32
    return out


def _seed_states(entropy: np.ndarray) -> np.ndarray:
    """(N, L) uint32 entropy words -> (N, 4) uint64: `SeedSequence(words).generate_state(4, np.uint64)` of each
    row (no spawn key), in uint32 arithmetic that wraps as numpy's C code does."""
    n, length = entropy.shape
    consts = iter(_consts(_SS_POOL * _SS_POOL + max(0, length - _SS_POOL) * _SS_POOL, _SS_INIT_A, _SS_MULT_A))

    def hashmix(v):
        h = next(consts)
        v = (v ^ np.uint32(h)) * np.uint32((h * _SS_MULT_A) & _M32)
        return v ^ (v >> np.uint32(16))

    def mix(x, y):
        r = np.uint32(_SS_MIX_L) * x - np.uint32(_SS_MIX_R) * y
        return r ^ (r >> np.uint32(16))

    e = entropy.astype(np.uint32)
    pool = [hashmix(e[:, i] if i < length else np.zeros(n, np.uint32)) for i in range(_SS_POOL)]
    for src in range(_SS_POOL):
        for dst in range(_SS_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_SS_POOL, length):
        for dst in range(_SS_POOL):
            pool[dst] = mix(pool[dst], hashmix(e[:, src]))
    words = []
    for i, h in enumerate(_consts(8, _SS_INIT_B, _SS_MULT_B)):
        v = (pool[i % _SS_POOL] ^ np.uint32(h)) * np.uint32((h * _SS_MULT_B) & _M32)
        words.append((v ^ (v >> np.uint32(16))).astype(np.uint64))
    return np.stack([words[2 * k] | (words[2 * k + 1] << _U64(32)) for k in range(4)], 1)


def _mul128(ah, al, bh: int, bl: int):
    """(ah, al) * (bh, bl) mod 2**128 over uint64 arrays (b a constant)."""
    m = _U64(_M32)
    a0, a1, b0, b1 = al & m, al >> _U64(32), _U64(bl & _M32), _U64(bl >> 32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> _U64(32)) + (p01 & m) + (p10 & m)
    hi = p11 + (p01 >> _U64(32)) + (p10 >> _U64(32)) + (mid >> _U64(32))
    return hi + al * _U64(bh) + ah * _U64(bl), (p00 & m) | (mid << _U64(32))


def _add128(ah, al, bh, bl):
    lo = al + bl
    return ah + bh + (lo < al).astype(np.uint64), lo


def _pcg64_doubles(states: np.ndarray, count: int) -> np.ndarray:
    """(N, 4) seed states -> (N, count): `np.random.Generator(PCG64(state)).random(count)` of each row."""
    mh, ml = _PCG_MULT >> 64, _PCG_MULT & ((1 << 64) - 1)
    with np.errstate(over="ignore"):
        seed_h, seed_l, inc_h, inc_l = (np.ascontiguousarray(states[:, k]) for k in range(4))
        ih, il = (inc_h << _U64(1)) | (inc_l >> _U64(63)), (inc_l << _U64(1)) | _U64(1)

        def step(sh, sl):
            return _add128(*_mul128(sh, sl, mh, ml), ih, il)

        sh, sl = step(np.zeros_like(seed_h), np.zeros_like(seed_l))
        sh, sl = step(*_add128(sh, sl, seed_h, seed_l))
        out = np.empty((len(states), count))
        for j in range(count):
            sh, sl = step(sh, sl)
            x, rot = sh ^ sl, sh >> _U64(58)
            v = (x >> rot) | (x << ((_U64(64) - rot) & _U64(63)))
            out[:, j] = (v >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return out


def draw_params_many(policy: AugmentPolicy, seed: int, keys: list[tuple[str, int]]) -> dict:
    """`draw_params` of many (image sha256, copy) keys at once: name -> array over the keys, bitwise equal."""
    seed_words, of_sha, of_copy = _words(int(seed)), {}, {}  # an image's copies share its words: made once
    for sha, c in keys:
        if sha not in of_sha:
            of_sha[sha] = _words(int(sha[:32], 16))
        if c not in of_copy:
            of_copy[c] = _words(int(c))
    entropy = [seed_words + of_sha[sha] + of_copy[c] for sha, c in keys]
    count = 7 if policy.horizontal_flip else 6
    d = np.empty((len(keys), count))
    by_length: dict = {}
    for i, words in enumerate(entropy):  # 6 words but for a rare hash with 32 leading zero bits
        by_length.setdefault(len(words), []).append(i)
    for rows in by_length.values():
        d[rows] = _pcg64_doubles(_seed_states(np.array([entropy[i] for i in rows], np.uint32)), count)

    def u(low, high, col):  # Generator.uniform: low + (high - low) * a double, in C doubles
        low, high = float(low), float(high)
        return low + (high - low) * d[:, col]

    z = policy.zoom_range
    return {"theta": u(-policy.rotation_range, policy.rotation_range, 2),
            "tx": u(-policy.height_shift_range, policy.height_shift_range, 3),
            "ty": u(-policy.width_shift_range, policy.width_shift_range, 4),
            "shear": u(-policy.shear_range, policy.shear_range, 5),
            "zx": u(1 - z, 1 + z, 0), "zy": u(1 - z, 1 + z, 1),
            "flip": d[:, 6] < 0.5 if policy.horizontal_flip else np.zeros(len(keys), bool)}


@functools.cache
def _centre(height: int, width: int, policy: AugmentPolicy) -> tuple:
    o1, o2 = height / 2 + policy.center_offset, width / 2 + policy.center_offset
    centre = np.array([[1, 0, o1], [0, 1, o2], [0, 0, 1]])
    return centre, np.linalg.inv(centre)


def copy_matrices(policy: AugmentPolicy, seed: int, keys: list[tuple[str, int]], height: int,
                  width: int) -> list[np.ndarray | None]:
    """`copy_matrix` of each (image sha256, copy) key, computed together (None for copy 0), bitwise equal.
    Below VECTOR_MIN keys the per-copy path is the faster one (numpy's per-call cost)."""
    todo = [i for i, (_, c) in enumerate(keys) if c != 0]
    out: list = [None] * len(keys)
    if len(todo) < VECTOR_MIN or int(seed) < 0 or any(keys[i][1] < 0 for i in todo):
        for i in todo:  # (a negative seed or copy: the scalar path's own error)
            out[i] = copy_matrix(policy, seed, keys[i][0], keys[i][1], height, width)
        return out
    p = draw_params_many(policy, seed, [keys[i] for i in todo])
    n = len(todo)
    to_rad = math.radians
    t = [to_rad(x) for x in p["theta"].tolist()]
    s = [to_rad(x) if policy.shear_units == "degrees" else float(x) for x in p["shear"].tolist()]
    m = np.zeros((4, n, 3, 3))
    m[:, :, 2, 2] = 1
    rotation, shift, shear, zoom = m  # as inverse_matrix builds each, one copy a layer
    rotation[:, 0, 0] = rotation[:, 1, 1] = [math.cos(x) for x in t]
    rotation[:, 1, 0] = [math.sin(x) for x in t]
    rotation[:, 0, 1] = -rotation[:, 1, 0]
    shift[:, 0, 0] = shift[:, 1, 1] = 1
    shift[:, 0, 2], shift[:, 1, 2] = p["tx"] * height, p["ty"] * width
    shear[:, 0, 0] = 1
    shear[:, 0, 1] = [-math.sin(x) for x in s]
    shear[:, 1, 1] = [math.cos(x) for x in s]
    zoom[:, 0, 0], zoom[:, 1, 1] = p["zx"], p["zy"]
    centre, back = _centre(height, width, policy)
    xy = centre @ (rotation @ shift @ shear @ zoom) @ back
    if policy.coordinates == "rowcol":
        swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
        xy = swap @ xy @ swap
    flip = p["flip"]
    if flip.any():
        xy[flip] = xy[flip] @ np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]])
    for k, i in enumerate(todo):
        out[i] = xy[k, :2]
    return out


VECTOR_MIN = 8  # keys from which `copy_matrices` computes them together


def inverse_matrix(params: dict, height: int, width: int, policy: AugmentPolicy = PRESETS["keras3"]) -> np.ndarray:
    """3x3 map from output (x, y) to input (x, y), composed in Keras' order about the centre."""
    t = math.radians(params["theta"])
    s = math.radians(params["shear"]) if policy.shear_units == "degrees" else float(params["shear"])
    # Keras composes rotation @ shift @ shear @ zoom about the centre. Keras 2.0.8 applied that matrix to
    # (row, col) coordinates; Keras 3 swaps it onto (x, y) first (so tx, drawn from the height range,
    # moves columns). OpenCV wants (x, y).
    rotation = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, params["tx"] * height], [0, 1, params["ty"] * width], [0, 0, 1]])
    shear = np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]])
    zoom = np.array([[params["zx"], 0, 0], [0, params["zy"], 0], [0, 0, 1]])
    m = rotation @ shift @ shear @ zoom
    o1, o2 = height / 2 + policy.center_offset, width / 2 + policy.center_offset
    centre = np.array([[1, 0, o1], [0, 1, o2], [0, 0, 1]])
    m = centre @ m @ np.linalg.inv(centre)
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # (row, col) <-> (x, y)
    xy = swap @ m @ swap if policy.coordinates == "rowcol" else m
    if params["flip"]:  # Keras flips after the warp: output x reads warped column w-1-x
        xy = xy @ np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]])
    return xy


def warp_threads(n: int | None) -> int | None:
    """Set OpenCV's own threads per call (process-wide) and return what it was; None when OpenCV is absent or
    n is None. Extract warps in its own pool of threads, one warp per thread: OpenCV's pool inside each warp
    only adds CPU (about 1.8x the CPU per copy on a 2-core EPYC for no more copies per second)."""
    if n is None:
        return None
    try:
        cv2 = _cv2_tables()[0]
    except ImportError:
        return None
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    return before


def copy_matrix(policy: AugmentPolicy, seed: int, image_sha256: str, copy: int, height: int,
                width: int) -> np.ndarray | None:
    """The 2x3 inverse map OpenCV warps copy `copy` with (None for copy 0, the original). The Python half of a
    warp: extract computes it where the image is decoded (a worker process), so the thread that warps holds
    the GIL only to call OpenCV."""
    if copy == 0:
        return None
    return inverse_matrix(draw_params(policy, seed, image_sha256, copy), height, width, policy)[:2]


def warp(image: np.ndarray, matrix: np.ndarray | None, policy: AugmentPolicy) -> np.ndarray:
    """`image` warped by `copy_matrix`'s map (OpenCV releases the GIL while it runs); None: the image itself."""
    if matrix is None:
        return image
    h, w = image.shape[:2]
    cv2, borders, interpolations = _cv2_tables()
    return cv2.warpAffine(image, matrix, (w, h), flags=interpolations[policy.interpolation] | cv2.WARP_INVERSE_MAP,
                          borderMode=borders[policy.fill_mode])


def augment(image: np.ndarray, policy: AugmentPolicy, seed: int, image_sha256: str, copy: int) -> np.ndarray:
    """Copy 0 is the original; copies 1.. are warped. `image` is HxWx3 uint8 at the model's size."""
    h, w = image.shape[:2]
    return warp(image, copy_matrix(policy, seed, image_sha256, copy, h, w), policy)
