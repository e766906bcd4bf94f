"""A procedural, dermoscopy-like image set written in the exact HAM10000 layout.

Each class has its own colour, size, border irregularity and texture (plus a class feature:
blue-grey veil, vessels, white centre, red lobules, scale); every image varies in lighting,
skin tone, rotation, scale, aspect, vignetting and hair-like strokes. Classes follow the
HAM10000 proportions (with a floor so that every class can be split into folds), and some
lesions have several images. Deterministic from the seed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crckd_jax.data import sources

# Images per class in the published HAM10000 (10015 images), in HAM10000_CLASSES order.
HAM10000_COUNTS = (1113, 6705, 514, 327, 1099, 115, 142)

# Per class: lesion RGB, radius as a fraction of the side, border irregularity, texture.
_STYLE = {
    "mel": ((70, 40, 30), 0.30, 0.22, 0.35),
    "nv": ((130, 85, 55), 0.22, 0.05, 0.10),
    "bcc": ((205, 135, 140), 0.24, 0.12, 0.15),
    "akiec": ((190, 95, 85), 0.26, 0.16, 0.40),
    "bkl": ((150, 110, 70), 0.27, 0.10, 0.30),
    "df": ((160, 105, 80), 0.18, 0.06, 0.12),
    "vasc": ((150, 30, 60), 0.17, 0.08, 0.10),
}
MARKER = "synthetic.json"


def class_counts(num_images: int, min_per_class: int) -> np.ndarray:
    """Images per class: HAM10000 proportions, each class at least `min_per_class`, summing to
    `num_images` (the largest class absorbs the rounding). [7] int."""
    props = np.asarray(HAM10000_COUNTS, np.float64) / sum(HAM10000_COUNTS)
    counts = np.maximum(np.round(props * num_images).astype(int), min_per_class)
    counts[np.argmax(props)] += num_images - counts.sum()
    if counts.min() < min_per_class:
        raise ValueError(f"{num_images} images cannot give each of 7 classes {min_per_class}")
    return counts


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a random `cells` x `cells` grid bicubic-upsampled. [size, size]."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.asarray(up, np.float32) / 127.5 - 1.0


def render(dx: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image of class `dx` (a HAM10000 dx code), `size` x `size` pixels."""
    colour, radius, irregularity, texture = _STYLE[dx]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    # Skin: tone, lighting gradient, vignetting.
    skin = np.array([225, 185, 160], np.float32) * rng.uniform(0.75, 1.1)
    skin = skin + rng.normal(0, 8, 3)
    light = 1.0 + rng.uniform(-0.2, 0.2) * xx + rng.uniform(-0.2, 0.2) * yy
    vignette = 1.0 - rng.uniform(0.0, 0.9) * (xx**2 + yy**2)
    img = skin[None, None] * (light * vignette)[..., None]
    img = img * (1.0 + 0.04 * _smooth_noise(rng, size, 8))[..., None]
    # Lesion shape: rotated ellipse with a random Fourier border.
    cx, cy = rng.normal(0, 0.05, 2)
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.7, 1.0)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / aspect
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    border = np.ones_like(theta)
    for k in range(2, 7):
        border += (
            irregularity * rng.uniform(0.2, 1.0) / k**0.5 * np.sin(k * theta + rng.uniform(0, 7))
        )
    r0 = radius * rng.uniform(0.7, 1.3)
    edge = rng.uniform(0.01, 0.03)
    mask = 1.0 / (1.0 + np.exp((rho - r0 * border) / edge))
    # Lesion colour and texture.
    tex = _smooth_noise(rng, size, int(rng.integers(4, 12)))
    fine = _smooth_noise(rng, size, max(4, size // 3))
    lesion = np.asarray(colour, np.float32) * rng.uniform(0.8, 1.2)
    lesion = lesion[None, None] * (1.0 + texture * (0.6 * tex + 0.4 * fine))[..., None]
    inner = rho / (r0 * border)
    if dx == "mel":  # blue-grey veil in part of the lesion
        veil = np.clip(_smooth_noise(rng, size, 5) * 2.0, 0, 1) * (inner < 0.8)
        lesion = lesion * (1 - veil[..., None]) + np.array([90, 100, 125]) * veil[..., None]
    elif dx == "df":  # white scar-like centre
        centre = np.exp(-((inner / 0.4) ** 2))
        lesion = lesion * (1 - centre[..., None]) + np.array([235, 220, 210]) * centre[..., None]
    elif dx == "vasc":  # red-purple lobules
        lob = (np.sin(u * rng.uniform(30, 50)) * np.sin(v * rng.uniform(30, 50)) > 0.2) * (
            inner < 1
        )
        lesion = (
            lesion * (1 - 0.4 * lob[..., None]) + np.array([110, 10, 40]) * 0.4 * lob[..., None]
        )
    elif dx == "akiec":  # white scale
        scale = (fine > 0.5) * (inner < 0.9)
        lesion = (
            lesion * (1 - 0.5 * scale[..., None])
            + np.array([240, 225, 220]) * 0.5 * scale[..., None]
        )
    img = img * (1 - mask[..., None]) + lesion * mask[..., None]
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    if dx == "bcc":  # arborising vessels
        for _ in range(int(rng.integers(2, 5))):
            pts = np.cumsum(rng.normal(0, 0.06, (5, 2)), axis=0) + rng.normal(0, r0 / 2, 2)
            draw.line([tuple((p + 0.5) * size) for p in pts], fill=(170, 20, 30), width=1)
    for _ in range(int(rng.integers(0, 7))):  # hair
        p0 = rng.uniform(0, size, 2)
        bend = rng.normal(0, size / 6, 2)
        direction = rng.normal(0, 1, 2)
        direction *= size * rng.uniform(0.3, 1.0) / np.linalg.norm(direction)
        pts = [tuple(p0 + t * direction + 4 * t * (1 - t) * bend) for t in np.linspace(0, 1, 6)]
        shade = int(rng.integers(10, 60))
        draw.line(pts, fill=(shade, shade - 5 if shade > 5 else 0, 0), width=max(1, size // 120))
    return out.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6) * size / 64))


def generate(
    out_dir: str,
    num_images: int = 500,
    image_size: int = 64,
    seed: int = 0,
    min_lesions_per_class: int = 8,
) -> str:
    """Writes `HAM10000_metadata.csv` and `HAM10000_images_part_{1,2}/<image_id>.jpg` into
    `out_dir` (replaced if it holds another generation) and returns `out_dir`. Every class gets
    at least `min_lesions_per_class` lesions. A finished folder with the same parameters is
    reused."""
    params = dict(
        num_images=num_images,
        image_size=image_size,
        seed=seed,
        min_lesions_per_class=min_lesions_per_class,
    )
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return out_dir
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    tmp = out_dir.rstrip("/") + ".incomplete"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    rng = np.random.default_rng(seed)
    counts = class_counts(num_images, min_lesions_per_class)
    rows = []
    lesion_number = 0
    for label, count in enumerate(counts):
        remaining, made = int(count), 0
        while remaining:
            still_needed = max(0, min_lesions_per_class - made - 1)  # lesions after this one
            images_of_lesion = min(
                remaining - still_needed, int(rng.choice([1, 1, 1, 1, 2, 2, 3]))
            )
            for _ in range(images_of_lesion):
                rows.append((f"HAM_{lesion_number:07d}", label))
            lesion_number += 1
            made += 1
            remaining -= images_of_lesion
    order = rng.permutation(len(rows))
    for part in (1, 2):
        os.makedirs(os.path.join(tmp, f"HAM10000_images_part_{part}"))
    with open(os.path.join(tmp, "HAM10000_metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        for n, i in enumerate(order):
            lesion_id, label = rows[i]
            dx = sources.HAM10000_CLASSES[label]
            image_id = f"ISIC_{24306 + n:07d}"
            image_rng = np.random.default_rng([seed, n])
            part = 1 if n < len(order) // 2 else 2
            render(dx, image_rng, image_size).save(
                os.path.join(tmp, f"HAM10000_images_part_{part}", image_id + ".jpg"), quality=95
            )
            writer.writerow(
                [
                    lesion_id,
                    image_id,
                    dx,
                    "synthetic",
                    int(image_rng.integers(20, 85)),
                    str(image_rng.choice(["male", "female"])),
                    "back",
                ]
            )
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(params, f)
    os.rename(tmp, out_dir)
    return out_dir
