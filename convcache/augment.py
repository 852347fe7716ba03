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
