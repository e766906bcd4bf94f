"""TFDS builders that prepare a downloaded folder once into array_record (no TensorFlow).

Each example: `image` uint8 [S, S, 3] (stored as raw pixels, S = store size: reading a record
costs no decoding, see docs/performance.md), `label` (ClassLabel in
the layout's class order), `item_id` and `group_id` (text). Records are written uncompressed
(TFDS's writer would zstd-compress each one, which costs ~0.25 ms of host CPU per 224 px
image at every read). Examples keep the order of the
layout's listing (`disable_shuffling`), so record r is the r-th listed item. The builder
config name encodes the store size and a digest of the source: its options and every listed
item (id, path, label, group, file size and modification time), so another folder or size,
or a source whose files or labels changed, gets its own data set, and a finished one is
reused only for the source as it was.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tqdm import tqdm

from crckd_jax import runlock
from crckd_jax.data import sources
from crckd_jax.errors import DataError

PROGRESS_FROM = 1000  # images: larger folders show a progress bar (done / total) while stored

_LISTERS = {
    "ham10000": sources.list_ham10000,
    "isic2018": sources.list_isic2018,
    "aptos": sources.list_aptos,
}


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
    """What to read from the manual directory and how to store it."""

    layout: str = "ham10000"  # 'ham10000' | 'isic2018' | 'aptos' | 'csv'
    store_size: int = 224  # side of the stored images in pixels
    class_names: tuple[str, ...] = ()
    csv_options: tuple[tuple[str, str], ...] = ()  # 'csv' layout: list_csv keyword arguments
    skip_bad: bool = False  # skip missing/undecodable images instead of raising DataError
    threads: int = 4  # decode/resize/encode threads

    def listing(self, root: str) -> sources.Listing:
        """The checked item listing of `root` for this layout."""
        if self.layout == "csv":
            options = dict(self.csv_options)
            names = tuple(n for n in options.pop("class_names").split(",") if n)
            return sources.list_csv(root, class_names=names, skip_bad=self.skip_bad, **options)
        return _LISTERS[self.layout](root, skip_bad=self.skip_bad)


def source_config(
    layout: str,
    root: str,
    store_size: int,
    csv_options: dict[str, str],
    skip_bad: bool,
    threads: int,
) -> tuple[SourceConfig, sources.Listing]:
    """Lists `root` (raising DataError on any problem) and returns the builder config that
    prepares it, with the listing."""
    options = tuple(sorted(csv_options.items())) if layout == "csv" else ()
    probe = SourceConfig(name="probe", layout=layout, csv_options=options, skip_bad=skip_bad)
    listing = probe.listing(root)
    items = [(it.item_id, it.path, it.label, it.group_id, *_file_state(it.path))
             for it in listing.items]
    key = json.dumps([layout, os.path.abspath(root), options, skip_bad, listing.class_names,
                      items])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    config = SourceConfig(
        name=f"s{store_size}_{digest}",
        version=Builder.VERSION,
        layout=layout,
        store_size=store_size,
        class_names=listing.class_names,
        csv_options=options,
        skip_bad=skip_bad,
        threads=threads,
        description=f"{layout} from {os.path.abspath(root)} at {store_size} px",
    )
    return config, listing


def _file_state(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file; (-1, -1) when it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def _encode(item: sources.Item, size: int, skip_bad: bool) -> np.ndarray | str:
    """The item's image at `size` (uint8 [size, size, 3]), or the DataError message when
    skipping."""
    try:
        img = sources.load_rgb(item.path, size)
    except DataError as e:
        if skip_bad:
            return str(e)
        raise
    return np.asarray(img, np.uint8)


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Labelled images from a manual directory; the layout comes from the SourceConfig."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Images stored as PNG.",
                     "2.0.0": "Images stored as raw uint8 pixels (no decoding when read)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the downloaded folder as data.dir (--config.data.dir=FOLDER); the folder "
        "layouts each source expects are in docs/data.md, section 'Preparing data'.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No download checksums to find next to the code. (TFDS's own lookup needs the
        `importlib_resources` package for builders defined inside a package.)"""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        size = config.store_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                                  encoding=tfds.features.Encoding.BYTES),
                    "label": tfds.features.ClassLabel(names=list(config.class_names)),
                    "item_id": tfds.features.Text(),
                    "group_id": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        listing = self.builder_config.listing(os.fspath(dl_manager.manual_dir))
        return {"train": self._generate_examples(listing)}

    def _generate_examples(self, listing: sources.Listing):
        config = self.builder_config
        pool = concurrent.futures.ThreadPoolExecutor(config.threads)
        try:
            encoded = pool.map(
                lambda it: _encode(it, config.store_size, config.skip_bad), listing.items
            )
            progress = tqdm(zip(listing.items, encoded), total=len(listing.items),
                            desc="preparing images", unit="img", dynamic_ncols=True,
                            disable=len(listing.items) < PROGRESS_FROM)
            for number, (item, data) in enumerate(progress):
                if isinstance(data, str):
                    continue  # skipped on request: prepare lists it by comparing item ids
                yield f"{number:09d}", {
                    "image": data,
                    "label": item.label,
                    "item_id": item.item_id,
                    "group_id": item.group_id,
                }
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# Registered names for the three kinds of source; they share the Builder code.
class CrckdHam10000(Builder):
    """HAM10000 / ISIC 2018 Task 3 (`layout` 'ham10000' or 'isic2018')."""


class CrckdAptos2019(Builder):
    """APTOS 2019 blindness detection training set (`layout` 'aptos')."""


class CrckdImageCsv(Builder):
    """A CSV of image paths and labels (`layout` 'csv')."""


_CLASSES = {
    "ham10000": CrckdHam10000,
    "isic2018": CrckdHam10000,
    "aptos": CrckdAptos2019,
    "csv": CrckdImageCsv,
}


PREPARE_LOCK = ".crckd-prepare.lock"  # in the TFDS folder: one build at a time


def _build_lock(data_dir: str, log):
    """An exclusive lock on `data_dir`/PREPARE_LOCK while a data set is built: runs sharing
    one `data.tfds_dir` build one at a time, and a later one finds the data set finished and
    reuses it instead of writing the same folder at the same time."""
    return runlock.exclusive(os.path.join(data_dir, PREPARE_LOCK),
                             f"waiting for another run preparing a data set in {data_dir}", log)


def build(config: SourceConfig, root: str, data_dir: str, log=print) -> str:
    """Prepares `root` into `data_dir` unless already done, one run at a time per
    `data_dir`; returns the data set's directory (readable with
    `tfds.builder_from_directory`)."""
    tfds.disable_progress_bar()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # TFDS warns about every custom config
    try:
        builder = _CLASSES[config.layout](
            data_dir=data_dir, config=config, file_format="array_record"
        )
        with _build_lock(data_dir, log), _uncompressed_records():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=root))
    finally:
        logging.set_verbosity(verbosity)
    return os.fspath(builder.data_dir)


class _UncompressedArrayRecord(file_adapters.ArrayRecordFileAdapter):
    """TFDS's array_record adapter writing records uncompressed (readers need no option)."""

    @classmethod
    def write_examples(cls, path, iterator):
        from array_record.python import array_record_module

        writer = array_record_module.ArrayRecordWriter(os.fspath(path),
                                                       "group_size:1,uncompressed")
        for _, serialized_example in iterator:
            writer.write(serialized_example)
        writer.close()


@contextlib.contextmanager
def _uncompressed_records():
    """TFDS writes array_record through `_UncompressedArrayRecord` inside the block."""
    formats = file_adapters.ADAPTER_FOR_FORMAT
    key = file_adapters.FileFormat.ARRAY_RECORD
    standard, formats[key] = formats[key], _UncompressedArrayRecord
    try:
        yield
    finally:
        formats[key] = standard
