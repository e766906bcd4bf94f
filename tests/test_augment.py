"""Device-side augmentation (crckd_jax.augment): torchvision / PIL parity, distributions,
keying. Fixture: tests/fixtures/augment_affine.npz (see tests/fixtures/README.md)."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from crckd_jax import augment
from crckd_jax.data import augment as host
from crckd_jax.step import example_keys

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "augment_affine.npz"
SIZES = (64, 96, 224)
P_MIN = 1e-3  # every distribution test must pass at this level (fixed seeds: deterministic)


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE) as f:
        return dict(f)


# Jitted once per module; each new image shape or case count compiles again.
_affine_flip_cases = jax.jit(jax.vmap(augment.affine_flip, in_axes=(None, 0, 0, 0, 0)))
_affine_nearest = jax.jit(augment.affine_nearest)
_normalize = jax.jit(augment.normalize)
_train_view = jax.jit(augment.train_view)
_two_views = jax.jit(augment.two_views)


@pytest.mark.parametrize("size", SIZES)
def test_affine_flip_equals_torchvision(fx, size):
    """F.affine(PIL, NEAREST, fill=0) then F.hflip: every fixture case, bit for bit."""
    for i, image in enumerate(fx[f"images_{size}"]):
        angle, tx, ty, flip = (fx[f"{n}_{size}"][i] for n in ("angle", "tx", "ty", "flip"))
        want = fx[f"out_{size}"][i]
        np.testing.assert_array_equal(
            np.asarray(_affine_flip_cases(image, angle, tx, ty, flip)), want)
        # The affine alone, then the flip, give the same images.
        affined = np.asarray(_affine_flip_cases(image, angle, tx, ty, np.zeros_like(flip)))
        for k in range(len(angle)):
            got = np.asarray(augment.hflip(affined[k])) if flip[k] else affined[k]
            np.testing.assert_array_equal(got, want[k])
    if size == 64:  # affine_nearest itself, for one case
        k = 9
        np.testing.assert_array_equal(
            np.asarray(_affine_nearest(image, angle[k], tx[k], ty[k])),
            np.asarray(augment.hflip(want[k])) if flip[k] else want[k])


def test_fixture_covers_corner_cases(fx):
    for size in SIZES:
        angles, tx = fx[f"angle_{size}"], fx[f"tx_{size}"]
        assert {0.0, 10.0, -10.0} <= set(angles.ravel().tolist())
        assert np.any(angles % 1 != 0)
        m = round(0.02 * size)
        assert {-m, m} <= set(tx.ravel().tolist()) | set(fx[f"ty_{size}"].ravel().tolist())
        assert set(fx[f"flip_{size}"].ravel().tolist()) == {False, True}


def test_normalize_close_to_torchvision(fx):
    """ToTensor + Normalize computes (x / 255 - mean) / std, we x * (1 / (255 std)) -
    mean / std (the host's float32 arithmetic): the roundings differ by a few ulp of
    values up to ~2.6, hence rtol = atol = 1e-6."""
    np.testing.assert_allclose(np.asarray(_normalize(fx["normalize_input"])),
                               fx["normalize_output"], rtol=1e-6, atol=1e-6)
    # Augmented fixture views (their uint8 images equal ours, tested above).
    got = _normalize(fx["out_64"][0, fx["normalized_cases_64"]])
    np.testing.assert_allclose(np.asarray(got), fx["normalized_64"], rtol=1e-6, atol=1e-6)


def test_normalize_equals_host_bit_for_bit():
    every = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)  # [256, 3]
    np.testing.assert_array_equal(np.asarray(augment.normalize(every)), host.normalize(every))
    np.testing.assert_array_equal(np.asarray(_normalize(every)), host.normalize(every))
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
    got = _normalize(images)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), host.normalize(images))
    # One definition of the constants.
    assert host.IMAGENET_MEAN is augment.IMAGENET_MEAN
    assert host.IMAGENET_STD is augment.IMAGENET_STD


# --- parameter distributions against torchvision's own draws -------------------------------

N_DRAWS = 20_000


def _jax_draws(size, seed=0):
    keys = jax.random.split(jax.random.key(seed), N_DRAWS)
    angle, tx, ty = jax.jit(jax.vmap(lambda k: augment.affine_params(k, size)))(keys)
    flip = jax.jit(jax.vmap(augment.flip_param))(jax.random.split(jax.random.key(seed + 1),
                                                                  N_DRAWS))
    return np.asarray(angle), np.asarray(tx), np.asarray(ty), np.asarray(flip)


@pytest.fixture(scope="module")
def draws_224():
    return _jax_draws(224)


def test_angle_distribution_matches_torchvision(fx, draws_224):
    angle = draws_224[0]
    assert angle.dtype == np.float32 and fx["draw_angle_224"].dtype == np.float32
    assert angle.min() >= -10.0 and angle.max() < 10.0
    assert stats.ks_2samp(angle, fx["draw_angle_224"]).pvalue > P_MIN
    assert stats.kstest(angle, stats.uniform(-10, 20).cdf).pvalue > P_MIN


def _translation_probabilities(size):
    """P(round(U(-m, m)) = k), m = 0.02 size: 1 / (2m) inside, the remainder at +-round(m)."""
    m = 0.02 * size
    top = round(m)
    p = np.full(2 * top + 1, 1.0 / (2 * m))
    p[0] = p[-1] = (m - (top - 0.5)) / (2 * m)
    return np.arange(-top, top + 1), p


@pytest.mark.parametrize("size", (224, 64))
def test_translation_distribution_matches_torchvision(fx, draws_224, size):
    values, p = _translation_probabilities(size)
    _, tx, ty, _ = draws_224 if size == 224 else _jax_draws(size, seed=5)
    for ours, theirs in ((tx, fx[f"draw_tx_{size}"]), (ty, fx[f"draw_ty_{size}"])):
        assert ours.dtype == np.int32
        # Exactly torchvision's range: -round(0.02 W) .. round(0.02 W), all values drawn.
        assert sorted(set(ours.tolist())) == sorted(set(theirs.tolist())) == values.tolist()
        counts = np.array([[np.sum(s == v) for v in values] for s in (ours, theirs)])
        assert stats.chi2_contingency(counts).pvalue > P_MIN
        for c in counts:
            assert stats.chisquare(c, p * c.sum()).pvalue > P_MIN


def test_translation_endpoints():
    """Endpoints of round(U(-4.48, 4.48)) have probability 0.98 / 8.96, not half."""
    values, p = _translation_probabilities(224)
    assert values.tolist() == list(range(-4, 5))
    assert math.isclose(p[0], 0.98 / 8.96) and math.isclose(p[1], 1 / 8.96)
    assert math.isclose(p.sum(), 1.0)
    values, p = _translation_probabilities(64)
    assert values.tolist() == [-1, 0, 1] and math.isclose(p[0], 0.78 / 2.56)


def test_rounding_is_half_to_even():
    # affine_params rounds with jnp.round: ties to even, as Python's round does.
    ties = np.array([-4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5], np.float32)
    np.testing.assert_array_equal(np.asarray(jnp.round(ties)),
                                  [round(float(t)) for t in ties])


def test_flip_frequency_matches_torchvision(fx, draws_224):
    ours, theirs = draws_224[3], fx["draw_flip"]
    assert ours.dtype == np.bool_
    for s in (ours, theirs):
        assert stats.binomtest(int(s.sum()), len(s), 0.5).pvalue > P_MIN
    table = [[ours.sum(), (~ours).sum()], [theirs.sum(), (~theirs).sum()]]
    assert stats.chi2_contingency(table).pvalue > P_MIN


# --- the host PIL path (no torch needed) -----------------------------------------------------

@pytest.mark.parametrize("shape, n", [((224, 224), 12), ((9, 9), 40), ((40, 56), 40)])
def test_affine_equals_host_pil_path(shape, n):
    h, w = shape
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.integers(0, 256, (h, w, 3), np.uint8)
    angle = rng.uniform(-10, 10, n).astype(np.float32)
    angle[:3] = [0.0, 10.0, -10.0]
    m = max(1, round(0.02 * max(h, w)))
    tx, ty = (rng.integers(-m, m + 1, n).astype(np.int32) for _ in range(2))
    flip = rng.random(n) < 0.5
    got = np.asarray(_affine_flip_cases(image, angle, tx, ty, flip))
    pil = Image.fromarray(image)
    for k in range(n):
        want = host.affine(pil, float(angle[k]), int(tx[k]), int(ty[k]))
        if flip[k]:
            want = want.transpose(Image.FLIP_LEFT_RIGHT)
        np.testing.assert_array_equal(got[k], np.asarray(want), err_msg=f"case {k}")


def _pillow_fixed_matrix(angle, tx, ty, h, w):
    """Pillow's affine_fixed coefficients from torchvision's matrix, in Python doubles."""
    cx, cy = w * 0.5, h * 0.5
    rot = math.radians(angle)
    m = [math.cos(rot), math.sin(rot), 0.0, -math.sin(rot), math.cos(rot), 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    v = [m[0], m[1], m[2] + m[0] * 0.5 + m[1] * 0.5, m[3], m[4], m[5] + m[3] * 0.5 + m[4] * 0.5]
    return [math.floor(x * 65536.0 + 0.5) for x in v]


def test_fixed_point_matrix_equals_pillow_formula():
    rng = np.random.default_rng(11)
    n = 5000
    angle = rng.uniform(-10, 10, n).astype(np.float32)
    angle[:4] = [0.0, -0.0, 10.0, -10.0]
    tx, ty = (rng.integers(-4, 5, n).astype(np.int32) for _ in range(2))
    got = np.asarray(jax.jit(jax.vmap(
        lambda a, x, y: augment.affine_fixed_matrix(a, x, y, 224, 224)))(angle, tx, ty))
    want = np.array([_pillow_fixed_matrix(float(a), int(x), int(y), 224, 224)
                     for a, x, y in zip(angle, tx, ty)])
    np.testing.assert_array_equal(got, want)


def test_affine_identity_and_dtypes():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 16, 3), np.uint8)
    np.testing.assert_array_equal(np.asarray(_affine_nearest(image, 0.0, 0, 0)), image)
    shifted = np.asarray(_affine_nearest(image, 0.0, 2, -1))  # right 2, up 1
    np.testing.assert_array_equal(shifted[:15, 2:], image[1:, :14])
    assert not shifted[:, :2].any() and not shifted[15].any()
    # Any dtype and trailing shape: the same pixels move.
    as_float = np.asarray(_affine_nearest(image[..., 0].astype(np.float32), 7.5, 1, 1))
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(
        as_float, np.asarray(_affine_nearest(image, 7.5, 1, 1))[..., 0])
    np.testing.assert_array_equal(np.asarray(augment.hflip(image)), image[:, ::-1])


# --- keying and vectorisation --------------------------------------------------------------

_example_keys = jax.jit(example_keys)


def _keys(batch, seed=0):
    """[B, 2] typed keys, as the train step makes them."""
    index = jnp.arange(batch, dtype=jnp.int32) + 100
    return _example_keys(jax.random.key_data(jax.random.key(seed)), jnp.int32(3), index)


@jax.jit
def _reference_view(key, image):
    """The reference's order with the public pieces: affine, flip, normalise."""
    k_affine, k_flip = jax.random.split(key)
    angle, tx, ty = augment.affine_params(k_affine, image.shape[:2])
    image = augment.affine_nearest(image, angle, tx, ty)
    image = jnp.where(augment.flip_param(k_flip), augment.hflip(image), image)
    return augment.normalize(image)


def test_views_are_deterministic_functions_of_keys():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    keys = _keys(4)
    a, b = _train_view(keys[0, 0], images[0]), _train_view(keys[0, 0], images[0])
    assert a.shape == (32, 32, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    views = [np.asarray(_train_view(keys[i, j], images[0])) for i in range(4) for j in range(2)]
    for i in range(len(views)):
        for j in range(i):
            assert not np.array_equal(views[i], views[j])
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(_reference_view(keys[i, 1], images[i])),
                                      np.asarray(_train_view(keys[i, 1], images[i])))


def test_two_views_equals_per_item_calls():
    """Jitted and vmapped two_views on raw key data = train_view per item on typed keys."""
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), np.uint8)
    keys = _keys(5, seed=4)
    student, teacher = _two_views(jax.random.key_data(keys), images)
    assert student.shape == teacher.shape == (5, 32, 32, 3)
    assert student.dtype == teacher.dtype == jnp.float32
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(student[i]),
                                      np.asarray(_train_view(keys[i, 0], images[i])))
        np.testing.assert_array_equal(np.asarray(teacher[i]),
                                      np.asarray(_train_view(keys[i, 1], images[i])))


def test_two_views_full_size_batch_runs():
    """Micro check (untimed): a [32, 224, 224, 3] batch with the step's typed keys compiles
    and runs on this backend."""
    images = np.random.default_rng(2).integers(0, 256, (32, 224, 224, 3), np.uint8)
    student, teacher = _two_views(_keys(32), images)
    assert student.shape == teacher.shape == (32, 224, 224, 3)
    assert student.dtype == teacher.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(student))) and bool(jnp.all(jnp.isfinite(teacher)))
    assert not np.array_equal(np.asarray(student), np.asarray(teacher))
