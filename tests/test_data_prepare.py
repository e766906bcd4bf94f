"""`--mode prepare` on tiny folders of each layout: counts, labels, groups, summary, errors."""

import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from crckd_jax import config as config_lib
from crckd_jax.config import to_settings
from crckd_jax.data import builders, prepare, sources
from crckd_jax.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"num_images", "class_names", "class_counts", "num_groups", "folds"}


def _config(name, arg="", **data):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.data.image_size = 16
    config.data.num_folds = 2
    config.memory.num_positives = 1
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _odd_image(path, n):
    """Cycles through the formats users bring: grayscale, palette, CMYK, alpha, EXIF, plain."""
    rgb = np.full((24, 30, 3), (40 * (n % 6), 90, 160), np.uint8)
    img = Image.fromarray(rgb)
    kind = n % 5
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == 0:
        img.convert("L").save(path)
    elif kind == 1 and path.lower().endswith(".png"):
        img.convert("P", palette=Image.ADAPTIVE).save(path)
    elif kind == 2 and path.lower().endswith((".jpg", ".jpeg")):
        img.convert("CMYK").save(path)
    elif kind == 3 and path.lower().endswith(".png"):
        img.convert("RGBA").save(path)
    elif kind == 4 and path.lower().endswith((".jpg", ".jpeg")):
        exif = Image.Exif()
        exif[0x0112] = 8
        img.save(path, exif=exif)
    else:
        img.save(path)


def _ham_folder(root, counts, images_per_lesion=None):
    """HAM10000 layout with counts[c] images of class c, in lesions of images_per_lesion[c]
    images (default 1)."""
    rows, n = [], 0
    for label, count in enumerate(counts):
        for i in range(count):
            rows.append(
                (
                    f"L{label}_{i // (images_per_lesion or {}).get(label, 1)}",
                    f"ISIC_{n:07d}",
                    sources.HAM10000_CLASSES[label],
                )
            )
            n += 1
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "HAM10000_metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        writer.writerows(
            [(lesion, image, dx, "histo", 40, "female", "face") for lesion, image, dx in rows]
        )
    for k, (_, image, _) in enumerate(rows):
        part = f"HAM10000_images_part_{1 + k % 2}"
        _odd_image(os.path.join(root, part, image + [".JPG", ".jpg", ".png", ".PNG"][k % 4]), k)
    return rows


def test_demo_prepare_writes_summary_and_folds(tmp_path):
    config = _config("demo", "tiny")
    config.data.num_folds = 5
    summary = prepare.prepare(to_settings(config), str(tmp_path), log=lambda _: None)
    with open(tmp_path / "data_summary.json") as f:
        assert json.load(f) == summary
    assert set(summary) == SUMMARY_KEYS
    assert summary["num_images"] == 140 == sum(summary["class_counts"])
    assert summary["class_names"] == list(sources.HAM10000_CLASSES)
    assert min(summary["class_counts"]) >= 8 and summary["num_groups"] < 140
    assert (
        all(f["train"] + f["test"] == 140 for f in summary["folds"]) and len(summary["folds"]) == 5
    )
    assert sum(f["test"] for f in summary["folds"]) == 140
    fold = prepare.load(str(tmp_path), 2)
    with open(tmp_path / "data" / "folds" / "fold_2.csv") as f:
        rows = list(csv.DictReader(f))
    train_groups = {r["group_id"] for r in rows if r["split"] == "train"}
    assert not train_groups & {r["group_id"] for r in rows if r["split"] == "test"}
    assert len(fold.fold.train) == summary["folds"][2]["train"]
    assert fold.source[int(fold.fold.test[0])]["image"].shape == (16, 16, 3)
    reused = prepare.prepare(to_settings(config), str(tmp_path), log=lambda _: None)
    assert reused == summary
    # Records are stored uncompressed, one per chunk (no decompression at every read).
    from array_record.python import array_record_module

    files = list(tmp_path.glob("data/tfds/**/*.array_record-*"))
    assert len(files) == 1
    reader = array_record_module.ArrayRecordReader(str(files[0]))
    options = reader.writer_options_string().split(",")
    reader.close()
    assert "uncompressed" in options and "group_size:1" in options


def test_ham10000_folder_with_odd_images(tmp_path):
    rows = _ham_folder(str(tmp_path / "ham"), [6, 8, 6, 6, 6, 6, 6])
    config = _config("ham10000", dir=str(tmp_path / "ham"), val_fraction=0.5)
    summary = prepare.prepare(to_settings(config), str(tmp_path / "w"), log=lambda _: None)
    assert summary["class_counts"] == [6, 8, 6, 6, 6, 6, 6] and summary["num_groups"] == 44
    data = prepare.load(str(tmp_path / "w"), 1)
    assert len(data.fold.val) > 0
    for record in range(44):
        example = data.source[record]
        assert example["item_id"].decode() == rows[record][1]
        assert example["group_id"].decode() == rows[record][0]
        assert example["image"].shape == (16, 16, 3)


def test_aptos_and_csv_folders(tmp_path, monkeypatch, capsys):
    aptos = tmp_path / "aptos"
    os.makedirs(aptos / "train_images")
    with open(aptos / "train.csv", "w") as f:
        f.write("id_code,diagnosis\n" + "".join(f"im{i},{i % 5}\n" for i in range(10)))
    for i in range(10):
        _odd_image(str(aptos / "train_images" / f"im{i}.png"), i)
    monkeypatch.setattr(builders, "PROGRESS_FROM", 10)  # the bar of large folders
    summary = prepare.prepare(to_settings(_config("aptos", dir=str(aptos))), str(tmp_path / "wa"),
                              log=lambda _: None
    )
    progress = capsys.readouterr().err
    assert "preparing images: 100%" in progress and "10/10" in progress
    assert summary["class_counts"] == [2] * 5 and summary["num_groups"] == 10
    assert summary["class_names"] == list(sources.APTOS_CLASSES)

    own = tmp_path / "own"
    rows = [(f"img/{i}.png", ["benign", "malignant"][i % 2], f"patient{i // 2}") for i in range(8)]
    for path, _, _ in rows:
        _odd_image(str(own / path), len(path))
    with open(own / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "diagnosis", "patient")] + rows)
    config = _config(
        "ham10000",
        dir=str(own),
        csv_file="meta.csv",
        image_column="file",
        label_column="diagnosis",
    )
    config.data.source = "csv"
    summary = prepare.prepare(to_settings(config), str(tmp_path / "wc"), log=lambda _: None)
    assert summary["class_names"] == ["benign", "malignant"] and summary["num_groups"] == 8
    config.data.group_column = "patient"
    summary = prepare.prepare(to_settings(config), str(tmp_path / "wg"), log=lambda _: None)
    assert summary["num_groups"] == 4 and summary["class_counts"] == [4, 4]


def test_undecodable_image_is_named_or_skipped_on_request(tmp_path):
    _ham_folder(str(tmp_path / "ham"), [3, 3, 2, 2, 2, 2, 2])
    bad = tmp_path / "ham" / "HAM10000_images_part_2" / "ISIC_0000001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    config = _config("ham10000", dir=str(tmp_path / "ham"))
    with pytest.raises(DataError, match="ISIC_0000001.jpg.*cannot be decoded"):
        prepare.prepare(to_settings(config), str(tmp_path / "w"), log=lambda _: None)
    config.data.skip_bad_images = True
    lines = []
    summary = prepare.prepare(to_settings(config), str(tmp_path / "w"), log=lines.append)
    assert summary["num_images"] == 15 and summary["class_counts"][0] == 2
    assert "ISIC_0000001" in (tmp_path / "w" / "data" / "skipped.csv").read_text()
    assert any("Skipped 1 item" in line for line in lines)


def test_classes_too_small_are_named(tmp_path):
    _ham_folder(str(tmp_path / "empty"), [3, 3, 2, 2, 2, 2, 0])
    with pytest.raises(DataError, match=r"class 'vasc' \(label 6\) has no images"):
        prepare.prepare(to_settings(_config("ham10000", dir=str(tmp_path / "empty"))),
                        str(tmp_path / "w1"))
    _ham_folder(str(tmp_path / "lesions"), [3, 3, 2, 2, 2, 4, 2], images_per_lesion={5: 4})
    with pytest.raises(DataError, match=r"class 'df' has 4 image\(s\) in 1 group\(s\)"):
        prepare.prepare(to_settings(_config("ham10000", dir=str(tmp_path / "lesions"))),
                        str(tmp_path / "w2"))
    _ham_folder(str(tmp_path / "few"), [3, 3, 2, 2, 2, 2, 2])
    config = _config("ham10000", dir=str(tmp_path / "few"))
    config.memory.kind = "bank"
    config.memory.num_positives = 3
    with pytest.raises(
        DataError, match=r"class '\w+' has 1 training image\(s\) in fold \d.*num_positives=3"
    ):
        prepare.prepare(to_settings(config), str(tmp_path / "w3"), log=lambda _: None)


def test_config_errors_name_the_key():
    config = _config("demo")
    config_lib.validate(config)
    config.data.val_fraction = 0.9
    with pytest.raises(
        config_lib.ConfigError,
        match=r"'data.val_fraction' is 0.9: expected a number in \[0.0, 0.5\]",
    ):
        config_lib.validate(config)
    config = _config("demo")
    config.memory.kind = "ring"
    with pytest.raises(
        config_lib.ConfigError, match=r"'memory.kind' is 'ring': expected one of 'queue', 'bank'"
    ):
        config_lib.validate(config)
    config = config_lib.default_config()
    config.data.extra = 1
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'data.extra'"):
        config_lib.validate(config)
    as_dict = config_lib.default_config().to_dict()
    as_dict["train"]["epochs"] = "many"
    config = ml_collections.ConfigDict(as_dict)
    with pytest.raises(
        config_lib.ConfigError, match=r"'train.epochs' is 'many': expected an integer >= 1"
    ):
        config_lib.validate(config)
    with pytest.raises(config_lib.ConfigError, match="'data.dir' is ''"):
        config_lib.validate(_config("aptos"))
    assert _config("ham10000", "baseline").loss.ccd_weight == 0.0
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'nope'"):
        _config("ham10000", "nope")


def test_launch_prepare_and_bad_fold(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "launch.py"),
        "--config",
        str(ROOT / "configs" / "demo.py") + ":tiny",
    ]
    done = subprocess.run(
        command + ["--workdir", str(tmp_path), "--mode", "prepare", "--config.data.num_folds=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "fold" in done.stdout
        and len(json.loads((tmp_path / "data_summary.json").read_text())["folds"]) == 3
    )
    done = subprocess.run(
        command
        + [
            "--workdir",
            str(tmp_path),
            "--mode",
            "prepare",
            "--config.data.fold=3",
            "--config.data.num_folds=3",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "'data.fold' is 3" in done.stderr


def test_a_changed_source_is_prepared_again_not_reused(tmp_path):
    """The prepared set records its source's digest (files, sizes, modification times,
    labels): after an image is replaced or a label edited, the training path prepares
    again instead of reusing the stale set; an unchanged source is reused."""
    from crckd_jax.trainer import load_data

    own = tmp_path / "own"
    rows = [(f"img/{i}.png", ["benign", "malignant"][i % 2]) for i in range(8)]
    for path, _ in rows:
        _odd_image(str(own / path), len(path))

    def write_labels(rows):
        with open(own / "meta.csv", "w", newline="") as f:
            csv.writer(f).writerows([("file", "diagnosis")] + rows)

    write_labels(rows)
    config = _config("ham10000", dir=str(own), csv_file="meta.csv", image_column="file",
                     label_column="diagnosis")
    config.data.source = "csv"
    settings, workdir, logs = to_settings(config), str(tmp_path / "w"), []
    assert "no prepared data set" in prepare.stale_reason(settings, workdir)
    load_data(settings, workdir, logs.append)
    first = json.loads((tmp_path / "w" / "data" / "dataset.json").read_text())["dataset_dir"]
    assert prepare.stale_reason(settings, workdir) is None
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(own / "img/3.png")
    assert "the source changed" in prepare.stale_reason(settings, workdir)
    load_data(settings, workdir, logs.append)
    second = json.loads((tmp_path / "w" / "data" / "dataset.json").read_text())["dataset_dir"]
    assert second != first and prepare.stale_reason(settings, workdir) is None
    write_labels([(p, "malignant" if p == "img/0.png" else d) for p, d in rows])
    assert "the source changed" in prepare.stale_reason(settings, workdir)
    load_data(settings, workdir, logs.append)
    summary = json.loads((tmp_path / "w" / "data_summary.json").read_text())
    assert summary["class_counts"] == [3, 5]  # img/0.png relabelled
    assert sum(line.startswith("preparing the data set:") for line in logs) == 3


def test_runs_sharing_a_tfds_dir_build_one_at_a_time(tmp_path):
    """Two runs with one `data.tfds_dir`: while one holds the folder's build lock the other
    waits (saying so), then finds the data set built and reuses it; both prepare the same
    data set directory."""
    import fcntl
    import threading

    own = tmp_path / "own"
    rows = [(f"img/{i}.png", ["benign", "malignant"][i % 2]) for i in range(8)]
    for path, _ in rows:
        _odd_image(str(own / path), len(path))
    with open(own / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "diagnosis")] + rows)
    config = _config("ham10000", dir=str(own), csv_file="meta.csv", image_column="file",
                     label_column="diagnosis", tfds_dir=str(tmp_path / "tfds"))
    config.data.source = "csv"
    settings = to_settings(config)
    os.makedirs(tmp_path / "tfds")
    logs, results = [], {}
    with open(tmp_path / "tfds" / builders.PREPARE_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run is building
        second = threading.Thread(target=lambda: results.update(
            w2=prepare.prepare(settings, str(tmp_path / "w2"), log=logs.append)))
        second.start()
        second.join(timeout=3)
        assert second.is_alive() and not results  # waiting for the lock
        assert any("waiting for another run preparing a data set" in line for line in logs)
        fcntl.flock(held, fcntl.LOCK_UN)
    second.join(timeout=120)
    assert not second.is_alive() and results["w2"]["class_counts"] == [4, 4]
    results["w1"] = prepare.prepare(settings, str(tmp_path / "w1"), log=logs.append)
    assert results["w1"] == results["w2"]
    built = list((tmp_path / "tfds").glob("crckd_*/*/*/dataset_info.json"))
    assert len(built) == 1
