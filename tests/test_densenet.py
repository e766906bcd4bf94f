"""BatchNorm (torch numerics) and DenseNet / CRCKDNet: structure, init and torchvision parity."""

import collections
import functools
import pathlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from crckd_jax.models import kernels as kernels_lib
from crckd_jax.models.batch_norm import BatchNorm, BatchNormSettings
from crckd_jax.models.densenet import (
    DENSENET_PRESETS,
    CRCKDNet,
    DenseNetConfig,
    DenseNetFeatures,
    conv_kernel_init,
    densenet_config,
    linear_kernel_init,
)
from crckd_jax.models.torch_import import (
    classifier_from_state_dict,
    import_densenet,
    load_state_dict,
)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "densenet_small.npz"


# ----------------------------------------------------------------------------- BatchNorm


def _torch_bn_train_reference(x, scale, bias, running_mean, running_var, momentum, eps):
    """torch BatchNorm2d training step in float64: (output, new running mean, new running var)."""
    x = x.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)  # biased: used for normalisation
    y = (x - mean) / np.sqrt(var + eps) * scale + bias
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)
    return y, new_mean, new_var


def _bn_inputs(shape=(8, 5, 3, 6), seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, channels) + rng.uniform(-10, 10, channels)
    variables = {
        "params": {
            "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
            "bias": rng.normal(size=channels).astype(np.float32),
        },
        "batch_stats": {
            "mean": rng.normal(size=channels).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        },
    }
    return x.astype(np.float32), variables


def test_batch_norm_train_matches_torch_formula():
    x, variables = _bn_inputs()
    y, updates = BatchNorm(use_running_average=False).apply(
        variables, jnp.asarray(x), mutable=["batch_stats"]
    )
    p, s = variables["params"], variables["batch_stats"]
    y_ref, mean_ref, var_ref = _torch_bn_train_reference(
        x, p["scale"], p["bias"], s["mean"], s["var"], momentum=0.1, eps=1e-5
    )
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], var_ref, rtol=1e-5, atol=1e-6)


def test_batch_norm_variance_is_accurate_for_large_offsets():
    """Two-pass variance: E[x^2] - E[x]^2 in float32 would lose all digits at mean/std = 1e3."""
    rng = np.random.default_rng(2)
    x = (1000.0 + rng.normal(size=(16, 8, 8, 3))).astype(np.float32)
    bn = BatchNorm(use_running_average=False, momentum=1.0)
    variables = bn.init(jax.random.key(0), x)
    _, updates = bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], x.astype(np.float64).var(axis=(0, 1, 2), ddof=1), rtol=1e-3
    )


def test_batch_norm_eval_uses_running_stats():
    x, variables = _bn_inputs()
    bn = BatchNorm()
    y = bn.apply(variables, jnp.asarray(x), use_running_average=True)
    p, s = variables["params"], variables["batch_stats"]
    y_ref = (x.astype(np.float64) - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_batch_norm_init_values_and_no_update_during_init():
    x, _ = _bn_inputs()
    variables = BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.asarray(x))
    np.testing.assert_array_equal(variables["params"]["scale"], np.ones(6))
    np.testing.assert_array_equal(variables["params"]["bias"], np.zeros(6))
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(6))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32


def test_batch_norm_bfloat16_output_float32_stats():
    x, variables = _bn_inputs()
    bn = BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    y, updates = bn.apply(variables, jnp.asarray(x, jnp.bfloat16), mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert updates["batch_stats"]["var"].dtype == jnp.float32


def _autodiff_batch_norm(monkeypatch):
    """BatchNorm with JAX's differentiation of its statistics and normalisation instead of
    their hand-written backward passes."""
    from crckd_jax.models import batch_norm

    monkeypatch.setattr(batch_norm, "batch_moments", batch_norm.batch_moments_autodiff)
    monkeypatch.setattr(batch_norm, "normalize", batch_norm.normalize_autodiff)


@pytest.mark.parametrize("group_size, masked", [(0, False), (4, False), (0, True), (4, True)])
def test_batch_norm_hand_written_gradient_equals_autodiff(monkeypatch, group_size, masked):
    """The hand-written backward passes give JAX's gradient of the same forward pass, for
    the input, the scale and the bias; with groups, a mask, and a group without items."""
    x, variables = _bn_inputs(shape=(8, 5, 3, 6))
    weights = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    params = {"scale": variables["params"]["scale"] + 0.5, "bias": variables["params"]["bias"]}
    mask = jnp.asarray([True, False, True, True] + [False] * 4) if masked else None
    bn = BatchNorm(use_running_average=False, group_size=group_size)

    def gradient():
        loss = lambda p, x_: jnp.sum(bn.apply({"params": p, "batch_stats": variables[
            "batch_stats"]}, x_, mask=mask, mutable=["batch_stats"])[0] * weights)
        return jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))

    ours = gradient()
    _autodiff_batch_norm(monkeypatch)
    reference = gradient()
    assert np.abs(reference[1]).max() > 1e-3
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_norm_sums_are_one_reduction_on_a_gpu_and_two_elsewhere():
    """`sum_pair` lowers to one variadic reduction for an NVIDIA GPU and to two sums for the CPU,
    the TPU and ROCm; both give the sums (the CPU's bit for bit those of `jnp.sum`)."""
    from jax import export

    from crckd_jax.models import batch_norm

    a = np.random.default_rng(3).normal(size=(6, 50, 7)).astype(np.float32) + 4.0
    pair = functools.partial(batch_norm.sum_pair, axes=(0, 1))
    expected = (a.astype(np.float64).sum((0, 1)), np.square(a.astype(np.float64)).sum((0, 1)))
    for sums in (jax.jit(pair)(a, a * a),
                 jax.jit(functools.partial(batch_norm._sums_in_one_reduction, axes=(0, 1)))(
                     a, a * a)):
        for got, want in zip(sums, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(jax.jit(pair)(a, a * a), (jnp.sum(a, (0, 1)), jnp.sum(a * a, (0, 1))),
                         strict=True):
        np.testing.assert_array_equal(got, want)

    spec = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    for platform, reductions in (("cpu", 2), ("cuda", 1), ("rocm", 2), ("tpu", 2)):
        text = export.export(jax.jit(pair), platforms=[platform])(spec, spec).mlir_module()
        assert text.count("stablehlo.reduce(") == reductions, platform


def test_batch_norm_takes_known_statistics():
    """Statistics passed in (of parts of a concatenation, computed apart) give the same
    output, gradients and running statistics as those the layer computes itself."""
    from crckd_jax.models import batch_norm

    x, variables = _bn_inputs(shape=(8, 5, 3, 6))
    mask = jnp.asarray([True] * 6 + [False] * 2)
    bn = BatchNorm(use_running_average=False, group_size=4)

    def run(known):
        def loss(p, x_):
            statistics = batch_norm.concat_statistics(
                [batch_norm.batch_statistics(x_[..., :2], mask, None, 4),
                 batch_norm.batch_statistics(x_[..., 2:], mask, None, 4)]) if known else None
            y, upd = bn.apply({"params": p, "batch_stats": variables["batch_stats"]}, x_,
                              mask=mask, statistics=statistics, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), (y, upd)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], jnp.asarray(x))

    for a, b in zip(jax.tree.leaves(run(True)), jax.tree.leaves(run(False)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_norm_needs_two_values_per_channel_in_training():
    x, variables = _bn_inputs(shape=(1, 1, 1, 6))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])


@pytest.fixture(params=["hand-written", "autodiff"])
def bn_backward(request, monkeypatch):
    """BatchNorm's training pass with its hand-written backward pass, or with JAX's
    differentiation of the same forward pass (the reference it is checked against)."""
    if request.param == "autodiff":
        _autodiff_batch_norm(monkeypatch)
    return request.param


def test_batch_norm_axis_name_sync_equals_global_batch(bn_backward):
    """4 vmapped devices x 2 images with synchronised stats == one device with 8 images,
    with the hand-written backward pass and with autodiff."""
    x, variables = _bn_inputs(shape=(8, 5, 3, 6))
    weights = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)

    def step(bn, x, w):
        def loss(params, x):
            y, upd = bn.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x,
                mutable=["batch_stats"],
            )
            return jnp.sum(y * w), (y, upd["batch_stats"])

        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x
        )
        return y, stats, grads

    y, stats, (g_params, g_x) = step(BatchNorm(use_running_average=False), x, weights)

    def split(a):  # [8, ...] -> [4 devices, 2, ...]
        return a.reshape((4, 2) + a.shape[1:])

    synced = jax.vmap(
        functools.partial(
            step, BatchNorm(use_running_average=False, axis_name="d")),
        axis_name="d",
    )
    y_d, stats_d, (g_params_d, g_x_d) = synced(split(x), split(weights))

    np.testing.assert_allclose(y_d.reshape(y.shape), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_x_d.reshape(g_x.shape), g_x, rtol=1e-4, atol=1e-5)
    for key in ("mean", "var"):
        for device in range(4):
            np.testing.assert_allclose(stats_d[key][device], stats[key], rtol=1e-6, atol=1e-6)
    # Per-device parameter gradients sum to the global-batch gradient.
    for key in ("scale", "bias"):
        np.testing.assert_allclose(g_params_d[key].sum(0), g_params[key], rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- configs


def test_presets_and_feature_counts():
    assert densenet_config("densenet121") == DenseNetConfig(32, (6, 12, 24, 16), 64, 4)
    assert densenet_config("densenet169") == DenseNetConfig(32, (6, 12, 32, 32), 64, 4)
    assert densenet_config("densenet201") == DenseNetConfig(32, (6, 12, 48, 32), 64, 4)
    assert densenet_config("densenet_small") == DenseNetConfig(8, (2, 3, 2, 2), 16, 2)
    counts = {name: cfg.num_features for name, cfg in DENSENET_PRESETS.items()}
    assert counts["densenet121"] == 1024
    assert counts["densenet169"] == 1664
    assert counts["densenet201"] == 1920
    assert counts["densenet_small"] == 34
    assert counts["densenet_tiny"] < counts["densenet_small"]


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="densenet121.*densenet_tiny|densenet_tiny.*densenet121"):
        densenet_config("densenet999")


def test_config_accepts_numpy_values_and_is_hashable():
    cfg = DenseNetConfig(np.int64(8), np.array([2, 3, 2, 2]), np.int64(16), np.int64(2))
    assert cfg == densenet_config("densenet_small")
    assert hash(cfg) == hash(densenet_config("densenet_small"))


# ----------------------------------------------------------------------------- structure / init


@pytest.fixture(scope="module")
def tiny():
    cfg = densenet_config("densenet_tiny")
    model = CRCKDNet(cfg, num_classes=3, hidden_dim=16)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(0))
    return cfg, model, x, variables


def train_forward(model):
    """model.apply in train mode, compiled: (outputs, updated batch_stats)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))


def test_variable_tree_mirrors_torchvision_names(tiny):
    cfg, _, _, variables = tiny
    params, stats = variables["params"], variables["batch_stats"]
    assert set(params) == {"features", "fc_layer", "classifier"}
    assert set(stats) == {"features"}
    n = len(cfg.block_config)
    expected = {"conv0", "norm0", "norm5"}
    expected |= {f"denseblock{i + 1}" for i in range(n)}
    expected |= {f"transition{i + 1}" for i in range(n - 1)}
    assert set(params["features"]) == expected
    assert set(stats["features"]) == expected - {"conv0"}
    layer = params["features"]["denseblock1"]["denselayer1"]
    assert set(layer) == {"norm1", "conv1", "norm2", "conv2"}
    assert set(layer["norm1"]) == {"scale", "bias"}
    assert set(stats["features"]["denseblock1"]["denselayer1"]) == {"norm1", "norm2"}
    assert set(stats["features"]["norm5"]) == {"mean", "var"}
    assert set(params["features"]["transition1"]) == {"norm", "conv"}
    g, b, c0 = cfg.growth_rate, cfg.bn_size, cfg.num_init_features
    assert params["features"]["conv0"]["kernel"].shape == (7, 7, 3, c0)
    assert layer["conv1"]["kernel"].shape == (1, 1, c0, b * g)
    assert layer["conv2"]["kernel"].shape == (3, 3, b * g, g)
    transition_kernel = params["features"]["transition1"]["conv"]["kernel"]
    assert transition_kernel.shape == (1, 1, c0 + g, (c0 + g) // 2)
    assert params["fc_layer"]["kernel"].shape == (cfg.num_features, 16)
    assert params["classifier"]["kernel"].shape == (16, 3)


def test_output_shapes_follow_torch_rounding(tiny):
    cfg, model, _, variables = tiny
    height, width = 45, 70
    x = jnp.zeros((2, height, width, 3))
    fmap = DenseNetFeatures(cfg).apply({c: v["features"] for c, v in variables.items()}, x, False)
    h, w = (height - 1) // 2 + 1, (width - 1) // 2 + 1  # conv0: k7 s2 p3
    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # pool0: k3 s2 p1
    for _ in range(len(cfg.block_config) - 1):  # transitions: avg-pool k2 s2
        h, w = h // 2, w // 2
    assert fmap.shape == (2, h, w, cfg.num_features)
    out = model.apply(variables, x, train=False)
    assert out["pooled"].shape == (2, cfg.num_features)
    assert out["feature"].shape == (2, 16)
    assert out["logits"].shape == (2, 3)
    np.testing.assert_allclose(out["pooled"], jnp.maximum(fmap, 0).mean(axis=(1, 2)), rtol=1e-6)


def test_initializers_match_torch():
    key = jax.random.key(0)
    kernel = np.asarray(conv_kernel_init(key, (3, 3, 64, 128)))  # fan_in = 576
    z = kernel / np.sqrt(2.0 / 576)  # kaiming_normal_: N(0, 2 / fan_in)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert np.abs(z).max() > 4.0  # plain normal, not truncated at 2 std
    weight = np.asarray(linear_kernel_init(key, (1024, 128)))  # torch Linear: U(+-1/sqrt(fan_in))
    bound = 1.0 / np.sqrt(1024)
    assert np.abs(weight).max() <= bound and np.abs(weight).max() > 0.99 * bound
    assert abs(weight.std() - bound / np.sqrt(3.0)) < 0.01 * bound


def test_model_init_like_torchvision(tiny):
    _, _, _, variables = tiny
    z = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        name = "/".join(p.key for p in path)
        assert leaf.dtype == jnp.float32, name
        if name.endswith("/kernel") and leaf.ndim == 4:
            z.append(np.ravel(leaf) / np.sqrt(2.0 / np.prod(leaf.shape[:3])))
        elif name.endswith("/kernel"):
            assert np.abs(leaf).max() <= 1.0 / np.sqrt(leaf.shape[0]), name
        elif name.endswith("/scale") or name.endswith("/var"):
            np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
        else:  # BatchNorm and Linear biases, running means
            np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    z = np.concatenate(z)
    assert abs(z.std() - 1.0) < 0.1  # flax's default (lecun_normal) would give 0.71


def test_bfloat16_backbone_returns_float32(tiny):
    cfg, model, x, variables = tiny
    model16 = CRCKDNet(cfg, num_classes=3, hidden_dim=16, dtype=jnp.bfloat16)
    out16, upd = train_forward(model16)(variables, x)
    out32 = train_forward(model)(variables, x)[0]
    for key in ("pooled", "feature", "logits"):
        assert out16[key].dtype == jnp.float32
        scale = np.abs(out32[key]).max()
        np.testing.assert_allclose(out16[key], out32[key], atol=0.05 * scale)
    for leaf in jax.tree.leaves(upd):
        assert leaf.dtype == jnp.float32


def test_train_forward_updates_every_running_stat(tiny):
    _, model, x, variables = tiny
    _, upd = train_forward(model)(variables, x)
    old = jax.tree.leaves(variables["batch_stats"])
    new = jax.tree.leaves(upd["batch_stats"])
    assert len(old) == len(new)
    for a, b in zip(old, new, strict=True):
        assert not np.allclose(a, b)


def test_synchronised_batch_norm_network_equals_global_batch(tiny):
    cfg, model, x, variables = tiny
    synced = CRCKDNet(cfg, num_classes=3, hidden_dim=16, bn=BatchNormSettings(axis_name="d"))
    out, upd = train_forward(model)(variables, x)
    out_d, upd_d = jax.jit(jax.vmap(
        lambda xs: synced.apply(variables, xs, train=True, mutable=["batch_stats"]),
        axis_name="d",
    ))(x.reshape((2, 2) + x.shape[1:]))
    np.testing.assert_allclose(
        out_d["logits"].reshape(out["logits"].shape), out["logits"], rtol=1e-5, atol=1e-5
    )
    for a, b in zip(jax.tree.leaves(upd_d), jax.tree.leaves(upd), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-6)


def test_batch_norm_groups_normalise_each_group_and_keep_the_first_groups_stats(bn_backward):
    """group_size=4 on 8 items: each half normalised with its own statistics (as two
    DataParallel replicas of 4), running statistics updated from the first half only."""
    x, variables = _bn_inputs()  # [8, H, W, C]
    grouped = BatchNorm(use_running_average=False, group_size=4)
    plain = BatchNorm(use_running_average=False)
    y, upd = grouped.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    y0, upd0 = plain.apply(variables, jnp.asarray(x[:4]), mutable=["batch_stats"])
    y1, _ = plain.apply(variables, jnp.asarray(x[4:]), mutable=["batch_stats"])
    np.testing.assert_allclose(y, np.concatenate([y0, y1]), rtol=1e-6, atol=1e-6)
    for key in ("mean", "var"):
        np.testing.assert_allclose(upd["batch_stats"][key], upd0["batch_stats"][key],
                                   rtol=1e-6, atol=1e-7)
    # Gradients as for the two groups apart.
    loss = lambda m, xs: lambda v: jnp.sum(jnp.sin(m.apply(v, xs, mutable=["batch_stats"])[0]))
    g = jax.grad(loss(grouped, jnp.asarray(x)))(variables)["params"]
    g0 = jax.grad(loss(plain, jnp.asarray(x[:4])))(variables)["params"]
    g1 = jax.grad(loss(plain, jnp.asarray(x[4:])))(variables)["params"]
    for key in ("scale", "bias"):
        np.testing.assert_allclose(g[key], g0[key] + g1[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="group_size 3 does not divide the batch of 8"):
        BatchNorm(use_running_average=False, group_size=3).apply(
            variables, jnp.asarray(x), mutable=["batch_stats"])


def test_batch_norm_mask_leaves_padding_out_and_all_padding_updates_nothing():
    """A mask keeps the masked items out of the statistics (as if absent); a batch with no
    unmasked item leaves the running statistics as they were, with finite outputs."""
    x, variables = _bn_inputs()
    bn = BatchNorm(use_running_average=False)
    mask = np.array([True] * 5 + [False] * 3)
    noisy = x.copy()
    noisy[5:] = 1e3
    y, upd = bn.apply(variables, jnp.asarray(noisy), mask=jnp.asarray(mask),
                      mutable=["batch_stats"])
    y5, upd5 = bn.apply(variables, jnp.asarray(x[:5]), mutable=["batch_stats"])
    np.testing.assert_allclose(y[:5], y5, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        np.testing.assert_allclose(upd["batch_stats"][key], upd5["batch_stats"][key],
                                   rtol=1e-5, atol=1e-6)
    y0, upd0 = bn.apply(variables, jnp.asarray(x), mask=jnp.zeros(8, bool),
                        mutable=["batch_stats"])
    assert np.isfinite(y0).all()
    for key in ("mean", "var"):
        np.testing.assert_array_equal(upd0["batch_stats"][key],
                                      variables["batch_stats"][key])


def test_double_update_until_block3_equals_two_passes_of_the_first_stages(tiny):
    """double_update_until_block=3: norm0 .. denseblock3 (transition1, transition2 included)
    keep the running statistics of two updates with the same batch (the reference's second
    pass of features[0:9]); transition3, denseblock4 and norm5 those of one."""
    cfg, model, x, variables = tiny
    twice = CRCKDNet(cfg, num_classes=3, hidden_dim=16, double_update_until_block=3)
    out, got = twice.apply(variables, x, train=True, mutable=["batch_stats"])
    out1, once = model.apply(variables, x, train=True, mutable=["batch_stats"])
    _, two = model.apply({**variables, **once}, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out["logits"], out1["logits"])
    doubled = ("norm0", "denseblock1", "transition1", "denseblock2", "transition2",
               "denseblock3")
    feats = {k: v for k, v in got["batch_stats"]["features"].items()}
    assert set(feats) == {*doubled, "transition3", "denseblock4", "norm5"}
    for name, stats in feats.items():
        expected = (two if name in doubled else once)["batch_stats"]["features"][name]
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
        if name in doubled:  # and not what one update gives
            single = once["batch_stats"]["features"][name]
            assert not all(np.allclose(a, b, rtol=1e-4) for a, b in zip(
                jax.tree.leaves(stats), jax.tree.leaves(single)))


# ----------------------------------------------------------------------------- kernels


def test_auto_kernels_follow_the_default_backend(monkeypatch):
    assert kernels_lib.resolve_kernels("cpu") == "cpu"
    assert kernels_lib.resolve_kernels("standard") == "standard"
    for backend, expected in (("cpu", "cpu"), ("gpu", "standard"), ("tpu", "standard")):
        monkeypatch.setattr(kernels_lib.jax, "default_backend", lambda b=backend: b)
        assert kernels_lib.resolve_kernels("auto") == expected
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        kernels_lib.resolve_kernels("fast")


def _primitives(jaxpr) -> set[str]:
    """Names of all primitives in a jaxpr, sub-jaxprs (custom_vjp, jit, ...) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _outputs_and_grads(model, variables, x, cotangents):
    """For eval and train mode: the gradient w.r.t. params and input of
    sum(outputs * cotangents), the outputs, and the updated batch statistics (train)."""

    def loss(params, x, train):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        if train:
            out, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        else:
            out, upd = model.apply(v, x, train=False), {}
        return sum(jnp.vdot(out[k], cotangents[k]) for k in out), (out, upd)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    return {train: grad(variables["params"], x, train) for train in (False, True)}


@pytest.mark.parametrize(
    "name", ["densenet_tiny", pytest.param("densenet_small", marks=pytest.mark.slow)])
def test_cpu_and_standard_kernels_agree(name):
    """Same variables, same forward values and the same gradients (params and input, eval
    and train mode) with the CPU-tuned layers and with JAX's standard differentiation; the
    traced computations do differ as intended."""
    cfg = densenet_config(name)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    models = {k: CRCKDNet(cfg, num_classes=3, hidden_dim=16, kernels=k)
              for k in ("cpu", "standard")}
    # Identical variable trees: names, shapes, initial values (one compiled call for both).
    init = jax.jit(lambda key: {k: m.init(key, x, train=False) for k, m in models.items()})(
        jax.random.key(0))
    assert jax.tree.structure(init["cpu"]) == jax.tree.structure(init["standard"])
    for a, b in zip(jax.tree.leaves(init["cpu"]), jax.tree.leaves(init["standard"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    variables = init["cpu"]
    shapes = jax.eval_shape(lambda: models["cpu"].apply(variables, x, train=False))
    cotangents = {k: jax.random.normal(jax.random.key(i + 2), s.shape)
                  for i, (k, s) in enumerate(sorted(shapes.items()))}

    # The forward pass in train mode (both): one hand-written VJP per BatchNorm's
    # normalisation, one per batch statistics computed: norm0's, every norm2's, and once per
    # part of a dense block's concatenation (its input, each layer's new features), which the
    # later layers, the transition and norm5 share. 'cpu' adds one per 3x3 convolution and the
    # stem pool, 'standard' has a reduce_window pool.
    layers = sum(cfg.block_config)
    num_bn = 2 + 2 * layers + len(cfg.block_config) - 1
    num_statistics = 1 + 2 * layers + len(cfg.block_config)
    for k, model in models.items():
        jaxpr = jax.make_jaxpr(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
        counts = collections.Counter(e.primitive.name for e in jaxpr.jaxpr.eqns)
        assert counts["custom_vjp_call"] == num_bn + num_statistics + (
            layers + 1 if k == "cpu" else 0), k
        assert counts["reduce_window_max"] == (0 if k == "cpu" else 1), k

    results = {}
    for k, model in models.items():
        traced = jax.jit(functools.partial(_outputs_and_grads, model)).trace(
            variables, x, cotangents)
        prims = _primitives(traced.jaxpr.jaxpr)
        if k == "cpu":  # the stem pool's incoming gradient behind a barrier
            assert "optimization_barrier" in prims
            assert "select_and_scatter_add" not in prims
        else:  # JAX's own gradients: select-and-scatter for the max-pool, no barrier
            assert "select_and_scatter_add" in prims
            assert "optimization_barrier" not in prims
        results[k] = traced.lower().compile()(variables, x, cotangents)

    for train in (False, True):
        (grads_c, (out_c, upd_c)) = results["cpu"][train]
        (grads_s, (out_s, upd_s)) = results["standard"][train]
        # Forward: the same operations in the same order (measured: bit-identical).
        for a, b in zip(jax.tree.leaves((out_c, upd_c)), jax.tree.leaves((out_s, upd_s)),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        # Gradients: float32 sums in another order (the 3x3 kernel gradient as one matrix
        # product vs XLA's convolution),
        # and gradients that are differences of large terms: in train mode the network is
        # invariant to scaling norm0's output (the next BatchNorm normalises it away), so
        # norm0's scale gradient is ~1e-6 of the largest gradient and rounding noise at
        # rtol 1e-5. Measured: largest excess over rtol 1e-5, 5.2e-7 x the tree's largest
        # gradient (densenet_small, train; tiny 1.2e-7); atol = 2e-6 x that largest gradient.
        atol = 2e-6 * max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_s))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_c),
                                jax.tree.leaves(grads_s), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol,
                                       err_msg=f"train={train} {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kernels", ["cpu", "standard"])
def test_parity_with_torchvision_fixture(kernels):
    data = np.load(FIXTURE)
    assert float(data["bn_momentum"]) == pytest.approx(0.1)
    assert float(data["bn_eps"]) == pytest.approx(1e-5)
    cfg = DenseNetConfig(
        data["growth_rate"], data["block_config"], data["num_init_features"], data["bn_size"]
    )
    model = DenseNetFeatures(cfg, kernels=kernels)
    x = jnp.asarray(data["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    state_dict = load_state_dict(FIXTURE, prefix="sd/")
    # The backbone alone has no head, so an abstract template suffices: no random init.
    template = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    variables = import_densenet(state_dict, template, name="densenet_small")
    weight, bias = classifier_from_state_dict(state_dict)

    def pooled(fmap):  # torchvision: adaptive_avg_pool2d(relu(features(x)), 1)
        return np.asarray(jnp.maximum(fmap, 0).mean(axis=(1, 2)))

    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    pooled_eval = pooled(apply(variables, x, train=False))
    fmap, upd = apply(variables, x, train=True, mutable=("batch_stats",))
    pooled_train = pooled(fmap)
    norm5 = upd["batch_stats"]["norm5"]

    # Measured on CPU (float32, vs torch CPU): max abs error pooled 4.2e-7 (max |value| 2.5),
    # eval logits 1.9e-7, train logits 5.1e-7, norm5 running mean 6.0e-8, running var 1.2e-7;
    # max relative error 7.3e-6 (entries with |value| > 1e-3). The atol covers entries near 0,
    # where float32 sums accumulated in a different order than torch's differ by ~1e-8
    # (needed under jax.jit, whose fusions reorder them).
    tol = dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pooled_eval, data["pooled_eval"], **tol)
    np.testing.assert_allclose(pooled_eval @ weight.T + bias, data["logits_eval"], **tol)
    np.testing.assert_allclose(pooled_train @ weight.T + bias, data["logits_train"], **tol)
    np.testing.assert_allclose(norm5["mean"], data["norm5_running_mean_after_train"], **tol)
    np.testing.assert_allclose(norm5["var"], data["norm5_running_var_after_train"], **tol)
