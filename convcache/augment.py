"""Deterministic offline augmentation, shared by extract and the TensorFlow reference trainer.

The default policy is Chollet's ImageDataGenerator settings (DLwP sec. 5.3). Each augmented copy
is one composed affine warp (rotation, shift, shear, zoom, flip) done by OpenCV with edge
replication, which is Keras' fill_mode='nearest'. The parameters of copy c of an image come from
a generator seeded by (seed, the image's content hash, c), so a copy is the same whatever the
batch size, worker count, file order or interruption.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentPolicy:
    rotation_range: float = 40.0  # degrees, uniform in [-r, r]
    width_shift_range: float = 0.2  # fraction of the width
    height_shift_range: float = 0.2  # fraction of the height
    shear_range: float = 0.2  # degrees, as Keras' ImageDataGenerator reads it
    zoom_range: float = 0.2  # zx and zy drawn independently in [1 - z, 1 + z]
    horizontal_flip: bool = True
    fill_mode: str = "nearest"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AugmentPolicy":
        return cls(**data)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


_BORDERS = {"nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT, "constant": cv2.BORDER_CONSTANT,
            "wrap": cv2.BORDER_WRAP}


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


def inverse_matrix(params: dict, height: int, width: int) -> np.ndarray:
    """3x3 map from output (x, y) to input (x, y), composed in Keras' order about the centre."""
    t, s = math.radians(params["theta"]), math.radians(params["shear"])
    # Keras builds the transform in (row, col) space: rotation @ shift @ shear @ zoom.
    rotation = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, params["tx"] * height], [0, 1, params["ty"] * width], [0, 0, 1]])
    shear = np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]])
    zoom = np.array([[params["zx"], 0, 0], [0, params["zy"], 0], [0, 0, 1]])
    rc = rotation @ shift @ shear @ zoom
    oy, ox = (height - 1) / 2, (width - 1) / 2
    centre = np.array([[1, 0, oy], [0, 1, ox], [0, 0, 1]])
    rc = centre @ rc @ np.linalg.inv(centre)
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # (row, col) <-> (x, y)
    xy = swap @ rc @ swap
    if params["flip"]:  # Keras flips after the warp: output x reads warped column w-1-x
        xy = xy @ np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]])
    return xy


def augment(image: np.ndarray, policy: AugmentPolicy, seed: int, image_sha256: str, copy: int) -> np.ndarray:
    """Copy 0 is the original; copies 1.. are warped. `image` is HxWx3 uint8 at the model's size."""
    if copy == 0:
        return image
    h, w = image.shape[:2]
    matrix = inverse_matrix(draw_params(policy, seed, image_sha256, copy), h, w)
    return cv2.warpAffine(image, matrix[:2], (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=_BORDERS[policy.fill_mode])
