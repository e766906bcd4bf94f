"""Layouts on disk -> item listings, and the image decoder on odd real-world files."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from crckd_jax.data import sources
from crckd_jax.errors import DataError


def _write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _image(path, colour=(200, 100, 50), size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_load_rgb_odd_formats(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)
    files = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "palette.png": Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE),
        "cmyk.JPG": Image.fromarray(rgb).convert("CMYK"),
        "alpha.PNG": Image.fromarray(rgb).convert("RGBA"),
        "wide16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "big.jpeg": Image.fromarray(rgb).resize((3000, 2000)),
    }
    for name, img in files.items():
        img.save(tmp_path / name)
    for name in files:
        out = np.asarray(sources.load_rgb(str(tmp_path / name), 16))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
        assert out[:, :6, 0].mean() > 200 and out[:, 10:, 0].mean() < 40, name


def test_load_rgb_applies_exif_orientation(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 255, 255)  # left half white
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = np.asarray(sources.load_rgb(str(tmp_path / "rot.jpg"), 20)).mean(axis=(1, 2))
    assert out[:8].mean() > 200 and out[12:].mean() < 50  # white half now on top


def test_load_rgb_names_bad_files(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.jpg.*cannot be decoded"):
        sources.load_rgb(str(tmp_path / "broken.jpg"), 8)
    with pytest.raises(DataError, match="missing.png.*does not exist"):
        sources.load_rgb(str(tmp_path / "missing.png"), 8)
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
    with pytest.raises(DataError, match="pipe.png.*is not a regular file"):
        sources.load_rgb(str(tmp_path / "pipe.png"), 8)


def _ham(root, rows):
    _write_csv(
        os.path.join(root, "HAM10000_metadata.csv"),
        ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"],
        [(lesion, image, dx, "histo", 50, "male", "back") for lesion, image, dx in rows],
    )
    for n, (_, image, _) in enumerate(rows):
        part = "HAM10000_images_part_1" if n % 2 else "HAM10000_images_part_2"
        _image(os.path.join(root, part, image + (".JPG" if n == 0 else ".jpg")))


def test_ham10000_layout(tmp_path):
    _ham(tmp_path, [("L1", "I1", "mel"), ("L1", "I2", "mel"), ("L2", "I3", "vasc")])
    listing = sources.list_ham10000(str(tmp_path))
    assert listing.class_names == sources.HAM10000_CLASSES
    assert [(i.item_id, i.label, i.group_id) for i in listing.items] == [
        ("I1", 0, "L1"),
        ("I2", 0, "L1"),
        ("I3", 6, "L2"),
    ]
    assert listing.items[0].path.endswith("I1.JPG")


def test_ham10000_bad_inputs(tmp_path):
    _ham(tmp_path, [("L1", "I1", "mel"), ("L2", "I2", "xyz")])
    with pytest.raises(DataError, match=r"row 3: unknown dx 'xyz'"):
        sources.list_ham10000(str(tmp_path))
    _ham(tmp_path, [("L1", "I1", "mel"), ("L2", "I1", "nv")])
    with pytest.raises(DataError, match=r"duplicate image_id 'I1' in rows 2 and 3"):
        sources.list_ham10000(str(tmp_path))
    _write_csv(str(tmp_path / "HAM10000_metadata.csv"), ["image_id", "diagnosis"], [("I1", "mel")])
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['lesion_id', 'dx'\]"):
        sources.list_ham10000(str(tmp_path))


def test_missing_images_fail_or_are_skipped_on_request(tmp_path):
    _ham(tmp_path, [("L1", "I1", "mel"), ("L2", "I2", "nv")])
    os.remove(tmp_path / "HAM10000_images_part_1" / "I2.jpg")
    with pytest.raises(DataError, match=r"1 image file\(s\) not found, e.g. 'I2'.*skip_bad"):
        sources.list_ham10000(str(tmp_path))
    listing = sources.list_ham10000(str(tmp_path), skip_bad=True)
    assert [i.item_id for i in listing.items] == ["I1"]
    assert listing.skipped == (("I2", "image file not found"),)


def test_duplicate_files_with_different_content(tmp_path):
    _ham(tmp_path, [("L1", "I1", "mel")])
    _image(str(tmp_path / "copy" / "I1.png"), colour=(1, 2, 3))
    with pytest.raises(DataError, match="image id 'I1' has two different files"):
        sources.list_ham10000(str(tmp_path))


def test_isic2018_layout(tmp_path):
    columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    _write_csv(
        str(
            tmp_path
            / "ISIC2018_Task3_Training_GroundTruth"
            / "ISIC2018_Task3_Training_GroundTruth.csv"
        ),
        ["image"] + columns,
        [("A", 0, 0, 1.0, 0, 0, 0, 0), ("B", 0, 1.0, 0, 0, 0, 0, 0), ("C", 0, 1, 0, 0, 0, 0, 0)],
    )
    _write_csv(
        str(tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv"),
        ["image", "lesion_id", "diagnosis_confirm_type"],
        [("A", "L9", "histo"), ("B", "L8", "histo")],
    )
    for name in "ABC":
        _image(str(tmp_path / "ISIC2018_Task3_Training_Input" / f"{name}.jpg"))
    listing = sources.list_ham10000(str(tmp_path))  # detected without HAM10000_metadata.csv
    assert [(i.item_id, i.label, i.group_id) for i in listing.items] == [
        ("A", 2, "L9"),
        ("B", 1, "L8"),
        ("C", 1, "C"),
    ]
    gt = (
        tmp_path
        / "ISIC2018_Task3_Training_GroundTruth"
        / "ISIC2018_Task3_Training_GroundTruth.csv"
    )
    _write_csv(str(gt), ["image"] + columns, [("A", 1, 1, 0, 0, 0, 0, 0)])
    with pytest.raises(DataError, match="row 2: expected exactly one 1"):
        sources.list_isic2018(str(tmp_path))


def test_aptos_layout(tmp_path):
    _write_csv(str(tmp_path / "train.csv"), ["id_code", "diagnosis"], [("a1", 0), ("b2", 4)])
    _image(str(tmp_path / "train_images" / "a1.png"))
    _image(str(tmp_path / "train_images" / "b2.PNG"))
    listing = sources.list_aptos(str(tmp_path))
    assert listing.class_names == sources.APTOS_CLASSES
    assert [(i.item_id, i.label, i.group_id) for i in listing.items] == [
        ("a1", 0, "a1"),
        ("b2", 4, "b2"),
    ]
    _write_csv(str(tmp_path / "train.csv"), ["id_code", "diagnosis"], [("a1", 0), ("b2", 5)])
    with pytest.raises(DataError, match=r"row 3: unknown diagnosis '5'"):
        sources.list_aptos(str(tmp_path))


def test_generic_csv(tmp_path):
    for name in ("x/1.png", "x/2.png", "3.png"):
        _image(str(tmp_path / name))
    rows = [("x/1.png", "cat", "p1"), ("x/2.png", "dog", "p1"), ("3.png", "cat", "")]
    _write_csv(str(tmp_path / "labels.csv"), ["path", "y", "patient"], rows)
    listing = sources.list_csv(str(tmp_path), "labels.csv", "path", "y", "patient")
    assert listing.class_names == ("cat", "dog")
    assert [(i.label, i.group_id) for i in listing.items] == [(0, "p1"), (1, "p1"), (0, "3.png")]
    ordered = sources.list_csv(
        str(tmp_path), "labels.csv", "path", "y", class_names=("dog", "cat")
    )
    assert [i.label for i in ordered.items] == [1, 0, 1]
    _write_csv(str(tmp_path / "ints.csv"), ["path", "y"], [("x/1.png", 2), ("3.png", 0)])
    ints = sources.list_csv(str(tmp_path), "ints.csv", "path", "y")
    assert ints.class_names == ("0", "1", "2") and [i.label for i in ints.items] == [2, 0]
    with pytest.raises(DataError, match=r"row 2: unknown label 'cat'.*\['dog', 'bird'\]"):
        sources.list_csv(str(tmp_path), "labels.csv", "path", "y", class_names=("dog", "bird"))
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['label'\]"):
        sources.list_csv(str(tmp_path), "labels.csv", "path", "label")
    with pytest.raises(DataError, match="nope.csv.*does not exist"):
        sources.list_csv(str(tmp_path), "nope.csv", "path", "y")
