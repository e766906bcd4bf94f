"""Downloaded layouts -> a checked list of labelled items, and the one image decoder.

Layouts: HAM10000 as published (`HAM10000_metadata.csv` + `<image_id>.jpg` in any subfolder),
ISIC 2018 Task 3 (`image` + one-hot MEL..VASC columns, optional `*LesionGroupings*.csv`), APTOS
2019 (`train.csv` + `train_images/<id_code>.png`), and a generic CSV (image path, label,
optional group). Every problem raises DataError naming the file, row or class.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from crckd_jax.errors import DataError

# HAM10000 `dx` codes in the column order of the ISIC 2018 ground truth (MEL, NV, BCC, AKIEC,
# BKL, DF, VASC): the label order of the reference code.
HAM10000_CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
APTOS_CLASSES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Item:
    """One labelled image: unique id, file path, label in [0, C), group id (lesion, patient)."""

    item_id: str
    path: str
    label: int
    group_id: str


@dataclasses.dataclass(frozen=True)
class Listing:
    """The items of a folder in file order, the class order, and the items skipped (why)."""

    class_names: tuple[str, ...]
    items: tuple[Item, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (item id or path, reason)


def load_rgb(path: str, size: int) -> Image.Image:
    """Decodes any PIL-readable image to RGB (EXIF orientation applied), bilinear-resized to
    `size` x `size` like torchvision's `Resize((size, size))`. Raises DataError naming the file
    (also for a path that is not a regular file, e.g. a FIFO, which would block the read)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"image file {path!r} is not a regular file")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(img, np.float64)
                img = Image.fromarray(
                    np.clip(wide / max(wide.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
                )
            elif img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            img.load()
            return img
    except FileNotFoundError as e:
        raise DataError(f"image file {path!r} does not exist") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image file {path!r} cannot be decoded as an image: {e}") from e


def read_csv(path: str, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts (header names stripped); DataError on missing columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [
                {k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader
            ]
    except UnicodeDecodeError as e:
        raise DataError(f"CSV {path!r} is not UTF-8 text: {e}") from e
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"CSV {path!r} lacks the column(s) {missing}; expected {list(required)}, "
            f"found {header}"
        )
    if not rows:
        raise DataError(f"CSV {path!r} has no rows")
    return rows


def _find(root: str, name: str) -> str | None:
    """The shallowest file named `name` (case-insensitive) under `root`, or None."""
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if f.lower() == name.lower()]
    return min(found, key=lambda p: (p.count(os.sep), p)) if found else None


def _index_images(root: str) -> dict[str, str]:
    """File stem -> path for every image under `root` (any case of extension). A stem found
    twice with different bytes is an error; byte-identical copies (as in some downloads that
    ship a folder twice) resolve to the first path in sorted order."""
    index: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, f)
            if stem in index:
                first = index[stem]
                with open(first, "rb") as a, open(path, "rb") as b:
                    if a.read() != b.read():
                        raise DataError(
                            f"image id {stem!r} has two different files: {first!r} and {path!r}"
                        )
                continue
            index[stem] = path
    return index


def _check_duplicates(ids: Iterable[str], what: str, csv_path: str) -> None:
    seen: dict[str, int] = {}
    for row, item_id in enumerate(ids, start=2):
        if item_id in seen:
            raise DataError(
                f"CSV {csv_path!r}: duplicate {what} {item_id!r} in rows {seen[item_id]} "
                f"and {row} (row 1 is the header)"
            )
        seen[item_id] = row


def _resolve(
    entries: list[tuple[str, str | None, int, str]], class_names: Sequence[str], skip_bad: bool
) -> Listing:
    """(item id, path or None if not found, label, group) -> Listing; missing files fail
    unless `skip_bad`, in which case they are listed as skipped."""
    missing = [
        (item_id, "image file not found") for item_id, path, _, _ in entries if path is None
    ]
    if missing and not skip_bad:
        shown = ", ".join(repr(m[0]) for m in missing[:10])
        raise DataError(
            f"{len(missing)} image file(s) not found, e.g. {shown}; fix the folder or "
            "set data.skip_bad_images=True to skip (and list) them"
        )
    items = tuple(Item(i, p, label, g) for i, p, label, g in entries if p is not None)
    return Listing(tuple(class_names), items, tuple(missing))


def list_ham10000(root: str, skip_bad: bool = False) -> Listing:
    """HAM10000 (`HAM10000_metadata.csv`: lesion_id, image_id, dx) or, when that file is
    absent, the ISIC 2018 Task 3 ground-truth layout. Group id = lesion_id."""
    meta = _find(root, "HAM10000_metadata.csv")
    if meta is None:
        return list_isic2018(root, skip_bad)
    rows = read_csv(meta, ("lesion_id", "image_id", "dx"))
    _check_duplicates((r["image_id"] for r in rows), "image_id", meta)
    images = _index_images(root)
    entries = []
    for row_number, r in enumerate(rows, start=2):
        dx = r["dx"].lower()
        if dx not in HAM10000_CLASSES:
            raise DataError(
                f'CSV {meta!r} row {row_number}: unknown dx {r["dx"]!r}; expected one of '
                f"{list(HAM10000_CLASSES)}"
            )
        entries.append(
            (
                r["image_id"],
                images.get(r["image_id"]),
                HAM10000_CLASSES.index(dx),
                r["lesion_id"] or r["image_id"],
            )
        )
    return _resolve(entries, HAM10000_CLASSES, skip_bad)


def list_isic2018(root: str, skip_bad: bool = False) -> Listing:
    """ISIC 2018 Task 3: a CSV with `image` and one-hot MEL, NV, BCC, AKIEC, BKL, DF, VASC;
    groups from a `*LesionGroupings*.csv` (image, lesion_id) when present, else one per image."""
    columns = [c.upper() for c in HAM10000_CLASSES]
    csvs = sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(root)
        for f in fs
        if f.lower().endswith(".csv") and "groundtruth" in f.lower()
    )
    if not csvs:
        raise DataError(
            f"{root!r} holds neither HAM10000_metadata.csv nor an ISIC 2018 "
            "*GroundTruth*.csv (columns image, MEL, NV, BCC, AKIEC, BKL, DF, VASC)"
        )
    gt = csvs[0]
    rows = read_csv(gt, ["image"] + columns)
    _check_duplicates((r["image"] for r in rows), "image", gt)
    groups: dict[str, str] = {}
    groupings = sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(root)
        for f in fs
        if f.lower().endswith(".csv") and "lesiongroupings" in f.lower()
    )
    if groupings:
        groups = {
            r["image"]: r["lesion_id"] for r in read_csv(groupings[0], ("image", "lesion_id"))
        }
    images = _index_images(root)
    entries = []
    for row_number, r in enumerate(rows, start=2):
        try:
            onehot = np.array([float(r[c]) for c in columns])
        except ValueError as e:
            raise DataError(
                f"CSV {gt!r} row {row_number}: one-hot columns must be numbers: {e}"
            ) from e
        if np.sum(onehot == 1.0) != 1 or np.sum(onehot != 0.0) != 1:
            raise DataError(
                f"CSV {gt!r} row {row_number}: expected exactly one 1 among {columns}, "
                f"got {onehot.tolist()}"
            )
        entries.append(
            (
                r["image"],
                images.get(r["image"]),
                int(np.argmax(onehot)),
                groups.get(r["image"]) or r["image"],
            )
        )
    return _resolve(entries, HAM10000_CLASSES, skip_bad)


def list_aptos(root: str, skip_bad: bool = False) -> Listing:
    """APTOS 2019: `train.csv` (id_code, diagnosis 0-4) and `<id_code>.png` in any subfolder
    (`train_images/` as downloaded). Every image is its own group."""
    path = _find(root, "train.csv")
    if path is None:
        raise DataError(
            f"{root!r} holds no train.csv (APTOS 2019 layout: train.csv with columns "
            "id_code, diagnosis and train_images/<id_code>.png)"
        )
    rows = read_csv(path, ("id_code", "diagnosis"))
    _check_duplicates((r["id_code"] for r in rows), "id_code", path)
    images = _index_images(root)
    entries = []
    for row_number, r in enumerate(rows, start=2):
        if r["diagnosis"] not in [str(i) for i in range(len(APTOS_CLASSES))]:
            raise DataError(
                f'CSV {path!r} row {row_number}: unknown diagnosis {r["diagnosis"]!r}; '
                f"expected an integer 0-{len(APTOS_CLASSES) - 1}"
            )
        entries.append((r["id_code"], images.get(r["id_code"]), int(r["diagnosis"]), r["id_code"]))
    return _resolve(entries, APTOS_CLASSES, skip_bad)


def list_csv(
    root: str,
    csv_file: str,
    image_column: str,
    label_column: str,
    group_column: str = "",
    class_names: Sequence[str] = (),
    skip_bad: bool = False,
) -> Listing:
    """A user's CSV: image paths (relative to the CSV's folder or absolute), labels as class
    names or integers, optional groups. Class order: `class_names` if given, else the sorted
    integer labels 0..max, else the sorted distinct names."""
    path = csv_file if os.path.isabs(csv_file) else os.path.join(root, csv_file)
    if not os.path.isfile(path):
        raise DataError(f"CSV {path!r} does not exist (data.dir + data.csv_file)")
    required = [image_column, label_column] + ([group_column] if group_column else [])
    rows = read_csv(path, required)
    _check_duplicates((r[image_column] for r in rows), f"{image_column!r} path", path)
    labels = [r[label_column] for r in rows]
    if class_names:
        names = tuple(class_names)
    elif all(v.lstrip("-").isdigit() for v in labels):
        names = tuple(str(i) for i in range(max(int(v) for v in labels) + 1))
    else:
        names = tuple(sorted(set(labels)))
    base = os.path.dirname(path)
    entries = []
    for row_number, r in enumerate(rows, start=2):
        value = r[label_column]
        if value in names:
            label = names.index(value)
        elif value.isdigit() and int(value) < len(names):
            label = int(value)
        else:
            raise DataError(
                f"CSV {path!r} row {row_number}: unknown label {value!r} in column "
                f"{label_column!r}; expected one of {list(names)} or 0-{len(names) - 1}"
            )
        if not r[image_column]:
            raise DataError(f"CSV {path!r} row {row_number}: empty {image_column!r}")
        image = os.path.join(base, r[image_column])
        group = r[group_column] if group_column and r[group_column] else r[image_column]
        entries.append((r[image_column], image if os.path.isfile(image) else None, label, group))
    return _resolve(entries, names, skip_bad)
