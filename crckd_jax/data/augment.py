"""The host side of the reference's image transforms, in PIL/numpy, as grain transforms.

`Resized` (the default path, `data.augment='device'`, and every evaluation): Resize((s, s))
bilinear only; the image stays uint8 and the devices do the rest (`crckd_jax.augment`).

`TwoViews` (`data.augment='host'`, kept to compare against): per view Resize((s, s)) ->
RandomAffine(degrees=10, translate=(0.02, 0.02)) with nearest resampling and zero fill ->
RandomHorizontalFlip(0.5) -> ImageNet normalisation, exactly as torchvision does on PIL
images; two independent views per example (student, teacher), float32 [s, s, 3] NHWC.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from PIL import Image

# One definition of the constants, shared with the device-side augmentation.
from crckd_jax.augment import (  # noqa: F401  (re-exported)
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_DEGREES,
    MAX_TRANSLATE,
    NORMALIZE_OFFSET,
    NORMALIZE_SCALE,
)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std, ImageNet statistics."""
    out = image.astype(np.float32)
    out *= NORMALIZE_SCALE
    out -= NORMALIZE_OFFSET
    return out


def resize(image: np.ndarray, size: int) -> Image.Image:
    """uint8 [H, W, 3] -> PIL image `size` x `size`, bilinear (no-op when already that size)."""
    img = Image.fromarray(image)
    return img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)


def affine(img: Image.Image, angle: float, tx: int, ty: int) -> Image.Image:
    """Rotation by `angle` degrees (clockwise, torchvision's `F.affine` convention) about the
    centre, then translation by (tx, ty) pixels; nearest resampling, zero fill, the same
    inverse matrix as torchvision's `F.affine` on PIL images."""
    w, h = img.size
    cx, cy = w * 0.5, h * 0.5
    rot = math.radians(angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    # Inverse map output -> input: C * R^-1 * C^-1 * T^-1 (torchvision's inverse matrix).
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return img.transform((w, h), Image.AFFINE, m, resample=Image.NEAREST, fillcolor=(0, 0, 0))


def augment(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """One random training view of a resized PIL image: float32 [s, s, 3], normalised."""
    w, h = img.size
    angle = rng.uniform(-MAX_DEGREES, MAX_DEGREES)
    tx = int(round(rng.uniform(-MAX_TRANSLATE * w, MAX_TRANSLATE * w)))
    ty = int(round(rng.uniform(-MAX_TRANSLATE * h, MAX_TRANSLATE * h)))
    img = affine(img, angle, tx, ty)
    if rng.uniform() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(np.asarray(img))


class TwoViews(grain.transforms.RandomMap):
    """{'image' uint8, ...} -> {'image_student', 'image_teacher' float32 [s, s, 3], ...}."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        img = resize(element.pop("image"), self.image_size)
        element["image_student"] = augment(img, rng)
        element["image_teacher"] = augment(img, rng)
        return element


class Resized(grain.transforms.Map):
    """{'image' uint8, ...} -> {'image' uint8 [s, s, 3], ...}: the model-size image that
    travels to the devices, which augment (training) and normalise it (`crckd_jax.augment`).
    A no-op when the stored size is the model size (the default)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, element: dict) -> dict:
        image = element["image"]
        if image.shape[:2] != (self.image_size, self.image_size):
            element["image"] = np.asarray(resize(image, self.image_size))
        return element
