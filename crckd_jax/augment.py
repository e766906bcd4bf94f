"""The reference's training augmentation as pure JAX functions (jit- and vmap-safe).

`two_views(keys, images)`: images uint8 [B, H, W, 3] (channels-last, already resized on
the host), keys [B, 2] PRNG keys -> student and teacher views, float32 [B, H, W, 3].
Each view (`train_view`) follows the reference's torchvision transforms on PIL images:
RandomAffine(degrees=10, translate=(0.02, 0.02)) with nearest resampling and zero fill
(angle in degrees, shift in whole pixels), RandomHorizontalFlip(0.5), ToTensor and
ImageNet Normalize. The affine matches Pillow's NEAREST ``affine`` pixel for pixel and
`normalize` matches the host's float32 arithmetic (`crckd_jax.data.augment`) bit for
bit; the draws follow torchvision's distributions from JAX's PRNG streams (not torch's).
How the match is reached and measured: docs/augment-notes.md.
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MAX_DEGREES = 10.0  # RandomAffine(degrees=10)
MAX_TRANSLATE = 0.02  # RandomAffine(translate=(0.02, 0.02)), fraction of the side
FLIP_PROBABILITY = 0.5  # RandomHorizontalFlip(p=0.5)

# float32 constants of the host's normalisation: x * NORMALIZE_SCALE - NORMALIZE_OFFSET.
NORMALIZE_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
NORMALIZE_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
# Every (uint8 value, channel) result of that arithmetic, [256, 3] float32.
_NORMALIZE_TABLE = np.arange(256, dtype=np.float32)[:, None] * NORMALIZE_SCALE \
    - NORMALIZE_OFFSET


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 [..., 3]: (x / 255 - mean) / std, ImageNet statistics.

    Bit for bit the host's ``crckd_jax.data.augment.normalize`` (float32
    ``x * (1 / (255 std)) - mean / std``), through a table of its 256 x 3 results.
    """
    table = jnp.asarray(_NORMALIZE_TABLE)
    return table[images.astype(jnp.int32), jnp.arange(3)]


# --- double-float arithmetic on float32 pairs (hi, lo), value hi + lo ---------------------

def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a, b):
    """(s, e) with s + e = a + b exactly, given |a| >= |b| (or a = 0)."""
    s = a + b
    return s, b - (s - a)


def _split(a):
    """a = hi + lo exactly, each with at most 12 significant bits (mask off 12 low bits)."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return hi, a - hi


def _two_prod(a, b):
    """a * b as a double-float, from four exact partial products (FMA-contraction safe)."""
    ah, al = _split(a)
    bh, bl = _split(b)
    s, e1 = _two_sum(ah * bh, ah * bl)
    s, e2 = _two_sum(s, al * bh)
    s, e3 = _two_sum(s, al * bl)
    return _fast_two_sum(s, (e1 + e2) + e3)


def _dd_add(x, y):
    s, e = _two_sum(x[0], y[0])
    t, f = _two_sum(x[1], y[1])
    s, e = _fast_two_sum(s, e + t)
    return _fast_two_sum(s, e + f)


def _dd_mul(x, y):
    p, e = _two_prod(x[0], y[0])
    return _fast_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def _dd_const(value) -> tuple[np.float32, np.float32]:
    """A Python float or Fraction as a float32 pair (hi, lo), rounded to nearest."""
    value = fractions.Fraction(value)
    hi = np.float32(float(value))
    return hi, np.float32(float(value - fractions.Fraction(float(hi))))


def _dd_scale(x, k):
    """Double-float x times float32 k."""
    p, e = _two_prod(x[0], k)
    return _fast_two_sum(p, e + x[1] * k)


# math.radians multiplies by the double pi / 180.
_DEG_TO_RAD = _dd_const(math.pi / 180.0)
# Taylor coefficients (exact rationals) of sin(r) / r and cos(r) in r^2, highest degree
# first, [7, 2 (sin, cos), 2 (hi, lo)]; the first omitted terms, r^13 / 13! and
# r^14 / 14!, are < 2^-60 for |r| <= 10 degrees.
_SIN_COS_COEFFS = np.array(
    [[_dd_const(fractions.Fraction((-1) ** k, math.factorial(2 * k + 1)) if k < 6 else 0),
      _dd_const(fractions.Fraction((-1) ** k, math.factorial(2 * k)))]
     for k in reversed(range(7))], np.float32)


def _dd_sin_cos(angle):
    """(sin r, cos r) as double-floats, r = radians(angle), for |angle| <= ~20 degrees."""
    p, e = _two_prod(angle, jnp.float32(_DEG_TO_RAD[0]))
    r = _fast_two_sum(p, e + angle * _DEG_TO_RAD[1])
    r2 = _dd_mul(r, r)
    r2 = (jnp.broadcast_to(r2[0], (2,)), jnp.broadcast_to(r2[1], (2,)))
    coeffs = jnp.asarray(_SIN_COS_COEFFS)

    def horner(i, acc):  # both polynomials at once, as vectors [sin, cos]
        return _dd_add(_dd_mul(acc, r2), (coeffs[i, :, 0], coeffs[i, :, 1]))

    poly = jax.lax.fori_loop(1, len(_SIN_COS_COEFFS), horner,
                             (coeffs[0, :, 0], coeffs[0, :, 1]))
    sin = _dd_mul((poly[0][0], poly[1][0]), r)
    return sin, (poly[0][1], poly[1][1])


def _fix(x):
    """Pillow's FIX, floor(65536 x + 0.5), of double-floats x (arrays), as int32."""
    h, l = _dd_add((x[0] * 65536.0, x[1] * 65536.0),
                   (jnp.full_like(x[0], 0.5), jnp.zeros_like(x[1])))
    fh = jnp.floor(h)
    # If h is not an integer, |l| <= ulp(h) / 2 cannot carry h + l past one.
    carry = jnp.where(fh == h, jnp.floor(l), 0.0)
    return fh.astype(jnp.int32) + carry.astype(jnp.int32)


def affine_fixed_matrix(angle, tx, ty, height: int, width: int) -> jax.Array:
    """Pillow's 16.16 fixed-point inverse matrix of torchvision's PIL `F.affine`.

    angle: float32 degrees (clockwise on screen), tx, ty: int32 pixels; returns int32 [6]
    ``(A0, A1, A2, A3, A4, A5)``: output pixel (x, y) reads input pixel
    ``((A2 + x A0 + y A1) >> 16, (A5 + x A3 + y A4) >> 16)``. height, width: the image's
    sides (static ints, up to ~16000 so that the int32 sums cannot overflow).
    """
    angle = jnp.asarray(angle, jnp.float32)
    sin, cos = _dd_sin_cos(angle)
    # Output pixel centre (0.5, 0.5) relative to the centre, translation undone (exact).
    kx = jnp.float32(0.5 - width * 0.5) - jnp.asarray(tx, jnp.float32)
    ky = jnp.float32(0.5 - height * 0.5) - jnp.asarray(ty, jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    # a2 + a0/2 + a1/2 = cx + cos kx + sin ky;  a5 + a3/2 + a4/2 = cy + (-sin) kx + cos ky.
    # Rows: a0 = cos, a1 = sin, a2, a3 = -sin, a4 = cos, a5 as vectors [6].
    m0 = (jnp.stack([cos[0], sin[0], cos[0], -sin[0], cos[0], -sin[0]]),
          jnp.stack([cos[1], sin[1], cos[1], -sin[1], cos[1], -sin[1]]))
    m1 = (jnp.stack([zero, zero, sin[0], zero, zero, cos[0]]),
          jnp.stack([zero, zero, sin[1], zero, zero, cos[1]]))
    one, k0 = jnp.float32(1.0), jnp.float32(0.0)
    scale0 = jnp.stack([one, one, kx, one, one, kx])
    scale1 = jnp.stack([k0, k0, ky, k0, k0, ky])
    centre = jnp.array([0.0, 0.0, width * 0.5, 0.0, 0.0, height * 0.5], jnp.float32)
    value = _dd_add(_dd_add((centre, jnp.zeros(6, jnp.float32)), _dd_scale(m0, scale0)),
                    _dd_scale(m1, scale1))
    return _fix(value)


def _source_index(angle, tx, ty, flip, height: int, width: int) -> jax.Array:
    """int32 [H, W]: flat input index read by each output pixel of affine (then flip), or
    -1 where it falls outside the image (zero fill)."""
    m = affine_fixed_matrix(angle, tx, ty, height, width)
    x = jnp.arange(width, dtype=jnp.int32)
    x = jnp.where(flip, width - 1 - x, x)[None, :]  # the flip reads the affine output mirrored
    y = jnp.arange(height, dtype=jnp.int32)[:, None]
    xin = (m[2] + x * m[0] + y * m[1]) >> 16
    yin = (m[5] + x * m[3] + y * m[4]) >> 16
    inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    return jnp.where(inside, yin * width + xin, -1)


def _gather(image, index):
    h, w = image.shape[:2]
    flat = image.reshape(h * w, *image.shape[2:])
    out = jnp.take(flat, jnp.maximum(index, 0), axis=0)
    inside = (index >= 0).reshape(index.shape + (1,) * (image.ndim - 2))
    return jnp.where(inside, out, jnp.zeros((), image.dtype))


def affine_nearest(image: jax.Array, angle, tx, ty) -> jax.Array:
    """[H, W, ...] (any dtype) -> same: torchvision ``F.affine(pil, angle, [tx, ty], 1.0,
    [0.0, 0.0], InterpolationMode.NEAREST, fill=0)`` exactly (docs/augment-notes.md).

    angle: float32 degrees (clockwise on screen, about (W/2, H/2)); tx, ty: int pixels
    (right, down), applied after the rotation. Pixels from outside the image are 0.
    """
    return affine_flip(image, angle, tx, ty, False)


def affine_flip(image: jax.Array, angle, tx, ty, flip) -> jax.Array:
    """``hflip(affine_nearest(image, angle, tx, ty))`` where `flip` (bool), else the affine
    alone, as a single gather. [H, W, ...] (any dtype) -> same."""
    h, w = image.shape[:2]
    return _gather(image, _source_index(angle, tx, ty, flip, h, w))


def hflip(image: jax.Array) -> jax.Array:
    """[H, W, ...] -> mirrored left-right (``F.hflip``)."""
    return image[:, ::-1]


def _height_width(image_size) -> tuple[int, int]:
    if np.ndim(image_size) == 0:
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def affine_params(key: jax.Array, image_size) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RandomAffine(degrees=10, translate=(0.02, 0.02)) parameters for one image.

    image_size: int (square) or (height, width). Returns (angle float32 degrees in
    [-10, 10), tx int32, ty int32) with tx = round_half_even(U(-0.02 W, 0.02 W)) (float32
    draw, torchvision's ``int(round(...))``) and ty likewise with H.
    """
    h, w = _height_width(image_size)
    # One threefry draw for the three numbers (cheaper to compile than three), then
    # jax.random.uniform's own arithmetic: max(lo, u (hi - lo) + lo). torch casts the
    # translation bounds (doubles) to float32 the same way.
    bound = np.array([MAX_DEGREES, MAX_TRANSLATE * w, MAX_TRANSLATE * h], np.float32)
    u = jax.random.uniform(key, (3,), jnp.float32)
    v = jnp.maximum(-bound, u * (2 * bound) - bound)
    # jnp.round rounds half to even, like Python's round.
    return v[0], jnp.round(v[1]).astype(jnp.int32), jnp.round(v[2]).astype(jnp.int32)


def flip_param(key: jax.Array) -> jax.Array:
    """RandomHorizontalFlip(0.5): bool scalar, True (flip) when U(0, 1) < 0.5."""
    return jax.random.bernoulli(key, FLIP_PROBABILITY)


def train_view(key: jax.Array, image: jax.Array) -> jax.Array:
    """One training view: uint8 [H, W, 3] -> float32 [H, W, 3].

    RandomAffine -> RandomHorizontalFlip -> ToTensor + Normalize, drawn from `key` (a
    typed PRNG key): ``affine_params(split(key)[0])``, ``flip_param(split(key)[1])``.
    The affine and the flip are one gather (`affine_flip`).
    """
    k_affine, k_flip = jax.random.split(key)
    angle, tx, ty = affine_params(k_affine, image.shape[:2])
    return normalize(affine_flip(image, angle, tx, ty, flip_param(k_flip)))


def _typed_keys(keys: jax.Array) -> jax.Array:
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.random.wrap_key_data(keys)


def two_views(keys: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Student and teacher views of a batch, vectorised.

    keys: [B, 2] typed PRNG keys (as ``step.example_keys`` makes them) or their raw key
    data ([B, 2, 2] uint32 for threefry); column 0 makes the student view, column 1 the
    teacher view, each by `train_view`. images: uint8 [B, H, W, 3]. Returns two float32
    [B, H, W, 3] arrays.
    """
    keys = _typed_keys(keys)
    # One vmapped view over [B, 2] (item, view): a single copy of the code to compile.
    views = jax.vmap(jax.vmap(train_view, in_axes=(0, None)))(keys, images)
    return views[:, 0], views[:, 1]
