"""grain pipelines on the tiny demo data set: batch contract, determinism, sharding, resume."""

import importlib.util
import pathlib

import numpy as np
import pytest
from PIL import Image

from crckd_jax.config import to_settings
from crckd_jax.data import augment, pipeline, prepare

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32


def _demo_config(arg="tiny"):
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    prepare.prepare(to_settings(_demo_config()), str(workdir), log=lambda _: None)
    return prepare.load(str(workdir), 0)


def _train(data, **kwargs):
    args = dict(
        global_batch_size=8,
        image_size=SIZE,
        num_epochs=2,
        seed=3,
        process_index=0,
        process_count=1,
    )
    args.update(kwargs)
    return list(pipeline.train_dataset(data, **args))


@pytest.mark.parametrize("augment_on", ["device", "host"])
def test_training_batch_contract(data, augment_on):
    batches = _train(data, num_epochs=1, augment_on=augment_on)
    full = len(data.fold.train) // 8
    assert len(batches) == full
    b = batches[0]
    if augment_on == "device":  # the stored pixels, as read: the step augments them
        assert set(b) == {"image", "label", "index"}
        assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
        for row, i in zip(b["image"], b["index"]):
            np.testing.assert_array_equal(row, data.source[int(data.fold.train[i])]["image"])
    else:
        assert set(b) == {"image_student", "image_teacher", "label", "index"}
        for key in ("image_student", "image_teacher"):
            assert b[key].shape == (8, SIZE, SIZE, 3) and b[key].dtype == np.float32
        assert not np.allclose(b["image_student"], b["image_teacher"])  # independent views
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    # 64-byte aligned, so the CPU backend puts a batch on its device without copying it
    assert all(x.ctypes.data % 64 == 0 for x in b.values())
    indices = np.concatenate([b["index"] for b in batches])
    assert (
        len(set(indices)) == full * 8
        and indices.min() >= 0
        and indices.max() < len(data.fold.train)
    )
    for b in batches:
        np.testing.assert_array_equal(b["label"], data.train_labels[b["index"]])
    assert data.class_counts.sum() == len(data.fold.train) == len(data.train_labels)


def test_same_seed_same_batches_and_reshuffled_epochs(data):
    first, again = _train(data), _train(data, read_threads=1)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = _train(data, seed=4)
    assert not np.array_equal(first[0]["index"], other[0]["index"])
    per_epoch = len(first) // 2
    assert not np.array_equal(first[0]["index"], first[per_epoch]["index"])


def test_processes_read_contiguous_slices_of_each_global_batch(data):
    # Process k of n reads rows [k * B/n, (k + 1) * B/n) of every global batch, with the
    # same augmentation: laid one after the other, the slices are the one-process batch
    # (the order jax.make_array_from_process_local_data assembles the global batch in).
    whole = _train(data, num_epochs=1)
    for count in (2, 4):
        shards = [_train(data, num_epochs=1, process_index=k, process_count=count)
                  for k in range(count)]
        assert all(len(s) == len(whole) for s in shards)
        for step, b in enumerate(whole):
            for key in b:
                np.testing.assert_array_equal(
                    np.concatenate([s[step][key] for s in shards]), b[key])
        assert shards[0][0]["index"].shape == (8 // count,)
    with pytest.raises(ValueError, match="not divisible"):
        _train(data, process_index=0, process_count=3)


def test_two_process_iterators_resume_and_rescale_to_one_process(data):
    kwargs = dict(global_batch_size=8, image_size=SIZE, num_epochs=2, seed=3)
    shards = [pipeline.train_dataset(data, process_index=k, process_count=2, **kwargs)
              for k in range(2)]
    iterators = [iter(s) for s in shards]
    for _ in range(3):
        for it in iterators:
            next(it)
    states = [it.get_state() for it in iterators]
    assert states[0] == states[1]  # one state serves every process
    rest = [list(it) for it in iterators]
    # Resumed with the same process count: exactly the remaining batches.
    for k, shard in enumerate(shards):
        resumed = iter(shard)
        resumed.set_state(states[k])
        again = list(resumed)
        assert len(again) == len(rest[k]) > 0
        for a, b in zip(again, rest[k]):
            np.testing.assert_array_equal(a["index"], b["index"])
    # Resumed by one process: the same global batches, whole.
    single = iter(pipeline.train_dataset(data, process_index=0, process_count=1, **kwargs))
    single.set_state(pipeline.rescale_iterator_state(states[0], 8, 2, 1))
    whole = list(single)
    assert len(whole) == len(rest[0])
    for step, b in enumerate(whole):
        for key in b:
            np.testing.assert_array_equal(
                np.concatenate([rest[0][step][key], rest[1][step][key]]), b[key])
    assert pipeline.rescale_iterator_state(states[0], 8, 2, 2) == states[0]


def test_restored_iterator_gives_exactly_the_remaining_batches(data):
    ds = pipeline.train_dataset(
        data,
        global_batch_size=8,
        image_size=SIZE,
        num_epochs=2,
        seed=3,
        process_index=0,
        process_count=1,
    )
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = list(it)
    resumed = iter(ds)
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) > 0
    for a, b in zip(rest, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_steps_per_epoch_continues_through_the_pass(data):
    short = _train(data, num_epochs=3, steps_per_epoch=2)
    long = _train(data, num_epochs=1)
    assert len(short) == 6
    for a, b in zip(short, long[:6]):
        np.testing.assert_array_equal(a["index"], b["index"])


def test_evaluation_is_padded_with_a_mask(data):
    n = len(data.fold.test)
    batches = list(
        pipeline.eval_dataset(
            data, global_batch_size=16, image_size=SIZE, process_index=0, process_count=1
        )
    )
    assert len(batches) == -(-n // 16)
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.dtype == bool and mask.sum() == n
    np.testing.assert_array_equal(index[mask], np.arange(n))
    np.testing.assert_array_equal(labels[mask], data.fold.test_labels)
    assert (index[~mask] == -1).all() and batches[0]["image"].shape == (16, SIZE, SIZE, 3)
    assert batches[0]["image"].dtype == np.uint8  # normalised on the devices
    for count in (2, 4):
        shards = [
            list(
                pipeline.eval_dataset(
                    data, global_batch_size=16, image_size=SIZE, process_index=k,
                    process_count=count,
                )
            )
            for k in range(count)
        ]
        for step, b in enumerate(batches):
            for key in b:
                np.testing.assert_array_equal(
                    np.concatenate([shard[step][key] for shard in shards]), b[key])
        seen = np.concatenate([b["index"][b["mask"]] for shard in shards for b in shard])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))


def test_affine_matches_torchvision_conventions():
    img = np.zeros((9, 9, 3), np.uint8)
    img[4, 6] = 255  # two pixels right of the centre pixel (4, 4)
    pil = Image.fromarray(img)
    shifted = np.asarray(augment.affine(pil, 0.0, 1, 2))
    assert shifted[6, 7, 0] == 255 and shifted.sum() == 3 * 255
    turned = np.asarray(augment.affine(pil, 90.0, 0, 0))  # clockwise: right -> below
    assert turned[6, 4, 0] == 255
    views = [augment.augment(pil, np.random.default_rng(s)) for s in range(30)]
    assert all(v.shape == (9, 9, 3) and v.dtype == np.float32 for v in views)
    np.testing.assert_allclose(
        augment.normalize(np.zeros((1, 1, 3), np.uint8))[0, 0],
        -augment.IMAGENET_MEAN / augment.IMAGENET_STD,
        rtol=1e-6,
    )


def test_partial_batch_rows_split_like_torch_chunk():
    """The remaining items of a pass go to the BatchNorm groups as torch.chunk splits a
    tensor over DataParallel replicas: ceil(r / groups) each, the last ones smaller or
    empty; every group padded to its size (-1)."""
    rows = pipeline.partial_batch_rows(49, 64, 32)
    np.testing.assert_array_equal(rows[:25], np.arange(25))
    np.testing.assert_array_equal(rows[32:56], np.arange(25, 49))
    assert (rows[25:32] == -1).all() and (rows[56:] == -1).all()
    np.testing.assert_array_equal(pipeline.partial_batch_rows(1, 4, 2), [0, -1, -1, -1])
    np.testing.assert_array_equal(pipeline.partial_batch_rows(5, 8, 2), [0, 1, 2, 3, 4, -1,
                                                                          -1, -1])
    np.testing.assert_array_equal(pipeline.partial_batch_rows(3, 4, 0 or 4), [0, 1, 2, -1])
    np.testing.assert_array_equal(pipeline.partial_batch_rows(8, 8, 4), np.arange(8))


@pytest.mark.parametrize("group_size", [0, 4])
def test_keep_partial_batch_uses_every_item_of_every_pass_once(data, group_size):
    """With keep_partial_batch each pass is ceil(N / B) batches holding every training item
    exactly once; only the last batch of a pass has masked padding (zero images), laid out
    in the BatchNorm groups."""
    n, b = len(data.fold.train), 12
    assert n % b, "the demo's tiny fold must leave a remainder"
    steps = -(-n // b)
    batches = _train(data, num_epochs=2, global_batch_size=b, keep_partial_batch=True,
                     group_size=group_size)
    assert len(batches) == 2 * steps
    assert pipeline.steps_per_pass(n, b, keep_partial_batch=True) == steps
    for epoch in range(2):
        part = batches[epoch * steps:(epoch + 1) * steps]
        for batch in part[:-1]:
            assert batch["mask"].all()
        last = part[-1]
        expected = pipeline.partial_batch_rows(n - (steps - 1) * b, b, group_size or b) >= 0
        np.testing.assert_array_equal(last["mask"], expected)
        assert not last["image"][~last["mask"]].any()
        indices = np.concatenate([x["index"][x["mask"]] for x in part])
        np.testing.assert_array_equal(np.sort(indices), np.arange(n))
        for x in part:
            np.testing.assert_array_equal(x["label"][x["mask"]],
                                          data.train_labels[x["index"][x["mask"]]])
