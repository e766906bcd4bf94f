"""torchvision DenseNet state_dict -> Flax variables: key mapping, layouts, errors, file IO."""

import functools
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crckd_jax.models.densenet import CRCKDNet, densenet_config
from crckd_jax.models import torch_import
from crckd_jax.models.torch_import import (
    classifier_from_state_dict,
    convert,
    import_densenet,
    load_state_dict,
    normalize_state_dict_keys,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
_OLD_NAME = re.compile(r"(denselayer\d+\.)(norm|conv)([12])\.")


@pytest.fixture(scope="module")
def dn121():
    """DenseNet-121 keys/shapes and templates: abstract, and concrete with a random head."""
    listing = json.loads((FIXTURES / "densenet121_keys.json").read_text())
    keys = [(key, tuple(shape)) for key, shape in listing]
    model = CRCKDNet(densenet_config("densenet121"), num_classes=3)
    init = functools.partial(model.init, train=False)
    abstract = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # Concrete stand-in for model.init (whose DenseNet-121 compile takes ~15 s on CPU): random
    # leaves of the template's shapes, so that untouched leaves are recognisable.
    rng = np.random.default_rng(0)
    concrete = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract
    )
    return keys, abstract, concrete


def _fake_state_dict(keys, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: np.array(7, np.int64) if k.endswith("num_batches_tracked")
        else rng.normal(size=shape).astype(np.float32)
        for k, shape in keys
    }


def _to_old_names(state_dict):
    """Names of the downloadable torchvision checkpoints: denselayer1.norm.1.weight etc."""
    return {_OLD_NAME.sub(r"\1\2.\3.", k): v for k, v in state_dict.items()}


def _flax_leaf(variables, torch_key):
    """Reference mapping, written independently of the importer."""
    *modules, name = torch_key.split(".")
    collection, leaf = {
        "running_mean": ("batch_stats", "mean"),
        "running_var": ("batch_stats", "var"),
        "bias": ("params", "bias"),
    }.get(name, ("params", None))
    node = variables[collection]
    for module in modules:
        node = node[module]
    if leaf is None:
        leaf = "kernel" if "kernel" in node else "scale"
    return node[leaf]


def _backbone_keys(keys):
    return [
        k for k, _ in keys
        if k.startswith("features.") and not k.endswith("num_batches_tracked")
    ]


def test_fixture_is_torchvision_densenet121(dn121):
    keys, _, _ = dn121
    assert len(keys) == 727
    assert keys[0] == ("features.conv0.weight", (64, 3, 7, 7))
    assert ("classifier.weight", (1000, 1024)) in keys


def test_import_densenet121_every_leaf(dn121):
    keys, _, template = dn121
    state_dict = _fake_state_dict(keys)
    old_style = {"module." + k: v for k, v in _to_old_names(state_dict).items()}
    assert "module.features.denseblock1.denselayer1.norm.1.weight" in old_style
    variables = import_densenet(old_style, template, name="densenet121")

    backbone = _backbone_keys(keys)
    assert len(backbone) == len(jax.tree.leaves(template["params"]["features"])) + len(
        jax.tree.leaves(template["batch_stats"]["features"])
    )
    for key in backbone:
        value = state_dict[key]
        expected = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
        np.testing.assert_array_equal(_flax_leaf(variables, key), expected, err_msg=key)
    # Spot checks of the layout conversion, element by element.
    w = state_dict["features.denseblock2.denselayer3.conv2.weight"]  # [out, in, kh, kw]
    k = variables["params"]["features"]["denseblock2"]["denselayer3"]["conv2"]["kernel"]
    assert k.shape == (3, 3, 128, 32)
    assert k[2, 0, 5, 7] == w[7, 5, 2, 0]
    assert variables["batch_stats"]["features"]["norm5"]["var"][3] == (
        state_dict["features.norm5.running_var"][3]
    )
    # The head is the template's, untouched.
    for name in ("fc_layer", "classifier"):
        assert variables["params"][name] is template["params"][name]
    # Old and new names give the same result.
    new_style = import_densenet(state_dict, template)
    for a, b in zip(jax.tree.leaves(new_style), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_import_into_abstract_template(dn121):
    keys, abstract, _ = dn121
    variables = import_densenet(_fake_state_dict(keys), abstract)
    for collection in ("params", "batch_stats"):
        leaves = jax.tree.leaves(variables[collection]["features"])
        templates = jax.tree.leaves(abstract[collection]["features"])
        assert len(leaves) == len(templates)
        for leaf, tmpl in zip(leaves, templates, strict=True):
            assert isinstance(leaf, jax.Array)
            assert leaf.shape == tmpl.shape and leaf.dtype == tmpl.dtype
    assert variables["params"]["classifier"] is abstract["params"]["classifier"]
    assert isinstance(variables["params"]["fc_layer"]["kernel"], jax.ShapeDtypeStruct)


def test_mismatch_error_lists_every_problem(dn121):
    keys, abstract, _ = dn121
    state_dict = _fake_state_dict(keys)
    del state_dict["features.norm5.running_var"]
    del state_dict["features.denseblock3.denselayer24.conv2.weight"]
    state_dict["features.denseblock4.denselayer17.conv1.weight"] = np.zeros((128, 1024, 1, 1))
    state_dict["fc.weight"] = np.zeros((3, 1024))
    state_dict["features.conv0.weight"] = np.zeros((32, 3, 7, 7))
    with pytest.raises(ValueError) as info:
        import_densenet(state_dict, abstract, name="densenet121")
    message = str(info.value)
    assert message.startswith("DenseNet checkpoint does not match densenet121: ")
    assert "missing 2 keys: ['features.denseblock3.denselayer24.conv2.weight', " \
        "'features.norm5.running_var']" in message
    assert "unexpected 2 keys: ['features.denseblock4.denselayer17.conv1.weight', " \
        "'fc.weight']" in message
    assert (
        "shape mismatch: features.conv0.weight expected (64, 3, 7, 7) got (32, 3, 7, 7)"
    ) in message


def test_import_rejects_a_different_architecture(dn121):
    _, abstract, _ = dn121
    small = load_state_dict(FIXTURES / "densenet_small.npz", prefix="sd/")
    with pytest.raises(ValueError, match=r"does not match densenet121: missing \d+ keys.*"
                                         r"shape mismatch: features.conv0.weight expected"):
        import_densenet(small, abstract, name="densenet121")


def test_normalize_state_dict_keys():
    value = np.ones(3, np.float32)
    normalized = normalize_state_dict_keys({
        "module.features.denseblock1.denselayer2.norm.1.running_mean": value,
        "features.denseblock1.denselayer2.conv.2.weight": value,
        "features.norm5.num_batches_tracked": np.array(3),
        "classifier.bias": value,
    })
    assert list(normalized) == [
        "features.denseblock1.denselayer2.norm1.running_mean",
        "features.denseblock1.denselayer2.conv2.weight",
        "classifier.bias",
    ]
    with pytest.raises(ValueError, match="two entries for 'features.norm5.bias'"):
        normalize_state_dict_keys(
            {"features.norm5.bias": value, "module.features.norm5.bias": value}
        )


def test_classifier_from_state_dict():
    weight, bias = np.ones((5, 34), np.float64), np.arange(5.0)
    w, b = classifier_from_state_dict({"module.classifier.weight": weight, "classifier.bias": bias})
    assert w.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(w, weight)
    np.testing.assert_array_equal(b, bias)
    with pytest.raises(ValueError, match="missing"):
        classifier_from_state_dict({"classifier.weight": weight})


def test_npz_round_trip_with_prefix(tmp_path):
    fixture = load_state_dict(FIXTURES / "densenet_small.npz", prefix="sd/")
    assert len(fixture) == 116 and "features.conv0.weight" in fixture
    path = tmp_path / "weights.npz"
    np.savez(path, x=np.zeros(3), **{"sd/" + k: v for k, v in fixture.items()})
    loaded = load_state_dict(str(path), prefix="sd/")
    assert list(loaded) == list(fixture)
    for key, value in fixture.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert set(load_state_dict(path)) == {"x"} | {"sd/" + k for k in fixture}


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_state_dict(missing)
    other = tmp_path / "weights.h5"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(
            f"unsupported checkpoint file {other}: expected one of ('.safetensors', '.npz', "
            "'.pth', '.pt', '.pth.tar')")):
        load_state_dict(other)
    npz = tmp_path / "w.npz"
    np.savez(npz, a=np.zeros(1))
    with pytest.raises(ValueError, match="starting with 'sd/'"):
        load_state_dict(npz, prefix="sd/")


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="needs PyTorch"):
        load_state_dict(path)


def test_pth_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    fixture = load_state_dict(FIXTURES / "densenet_small.npz", prefix="sd/")
    tensors = {k: torch.from_numpy(v) for k, v in fixture.items()}
    tensors["features.norm0.num_batches_tracked"] = torch.tensor(4)
    for name, payload in (
        ("plain.pth", tensors),
        ("wrapped.pth.tar", {"state_dict": tensors, "epoch": 3}),
        ("model.pt", {"model": {"module." + k: v for k, v in tensors.items()}}),
    ):
        torch.save(payload, tmp_path / name)
        loaded = normalize_state_dict_keys(load_state_dict(tmp_path / name))
        assert list(loaded) == list(fixture)
        for key, value in fixture.items():
            np.testing.assert_array_equal(loaded[key], value)


def _small_template():
    model = CRCKDNet(densenet_config("densenet_small"), num_classes=3)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jnp.zeros((1, 32, 32, 3)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def test_safetensors_imports_like_npz(tmp_path):
    """A .safetensors file of torchvision keys (old names, num_batches_tracked included) gives
    the same variables as the .npz it was written from."""
    from safetensors.numpy import save_file

    fixture = load_state_dict(FIXTURES / "densenet_small.npz", prefix="sd/")
    stored = _to_old_names(fixture)
    stored["features.norm0.num_batches_tracked"] = np.array(4, np.int64)
    npz, safetensors = tmp_path / "small.npz", tmp_path / "small.safetensors"
    np.savez(npz, **stored)
    save_file(stored, str(safetensors))
    loaded = load_state_dict(safetensors)
    assert set(loaded) == set(stored)
    template = _small_template()
    from_npz = import_densenet(load_state_dict(npz), template)
    from_safetensors = import_densenet(loaded, template)
    for path, leaf in jax.tree_util.tree_leaves_with_path(from_npz):
        other = from_safetensors
        for key in path:
            other = other[key.key]
        assert other.dtype == leaf.dtype
        np.testing.assert_array_equal(other, leaf, err_msg=jax.tree_util.keystr(path))
    kernel = from_safetensors["params"]["features"]["conv0"]["kernel"]
    np.testing.assert_array_equal(kernel, fixture["features.conv0.weight"].transpose(2, 3, 1, 0))
    prefix = "features.denseblock1."
    assert set(load_state_dict(safetensors, prefix=prefix)) == {
        k.removeprefix(prefix) for k in stored if k.startswith(prefix)}


@pytest.mark.parametrize("name, content, kind", [
    ("weights.safetensors", b"not a safetensors file at all", "a safetensors file"),
    ("weights.safetensors", b"", "a safetensors file"),
    ("weights.npz", b"PK\x03\x04 truncated", "an .npz archive"),
])
def test_corrupt_file_error_names_the_file(tmp_path, name, content, kind):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^cannot read {re.escape(str(path))} as {kind}: "):
        load_state_dict(path)


def test_npz_renamed_to_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "densenet.safetensors"
    path.write_bytes((FIXTURES / "densenet_small.npz").read_bytes())
    with pytest.raises(ValueError, match=f"^cannot read {re.escape(str(path))} as a "
                                         "safetensors file"):
        load_state_dict(path)


def test_convert_keeps_every_key(tmp_path, capsys):
    """The converter (here from an .npz, which needs no torch) writes the same keys and
    values, old names included; the result imports like the source."""
    stored = _to_old_names(load_state_dict(FIXTURES / "densenet_small.npz", prefix="sd/"))
    source, target = tmp_path / "small.npz", tmp_path / "small.safetensors"
    np.savez(source, **stored)
    assert torch_import.convert_main([str(source), str(target)]) == 0
    assert capsys.readouterr().out == f"wrote 116 tensors from {source} to {target}\n"
    converted = load_state_dict(target)
    assert set(converted) == set(stored)
    for key, value in stored.items():
        assert converted[key].dtype == value.dtype
        np.testing.assert_array_equal(converted[key], value)
    from safetensors import safe_open

    with safe_open(str(target), framework="np") as f:
        assert f.metadata() == {"format": "pt", "source": "small.npz"}
    # The same through `python -m crckd_jax.models.torch_import convert`.
    assert torch_import.main(["convert", str(source), str(tmp_path / "again.safetensors")]) == 0


def test_convert_errors(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert torch_import.convert_main([str(missing), str(tmp_path / "x.safetensors")]) == 1
    assert capsys.readouterr().err == f"error: checkpoint file not found: {missing}\n"
    with pytest.raises(ValueError, match="must end in .safetensors"):
        convert(FIXTURES / "densenet_small.npz", tmp_path / "out.npz")


def test_convert_pth(tmp_path):
    """torchvision .pth -> .safetensors -> the same state dict, without torch for reading."""
    torch = pytest.importorskip("torch")
    fixture = _to_old_names(load_state_dict(FIXTURES / "densenet_small.npz", prefix="sd/"))
    tensors = {k: torch.from_numpy(v) for k, v in fixture.items()}
    tensors["features.norm0.num_batches_tracked"] = torch.tensor(4)
    tensors["features.norm5.weight"] = tensors["features.norm5.weight"].to(torch.bfloat16)
    pth, target = tmp_path / "densenet_small.pth", tmp_path / "densenet_small.safetensors"
    torch.save({"state_dict": tensors}, pth)
    assert convert(pth, target) == len(tensors)
    converted = load_state_dict(target)
    assert set(converted) == set(tensors)
    assert converted["features.norm0.num_batches_tracked"] == 4
    assert converted["features.norm5.weight"].dtype == np.float32  # bfloat16 stored as float32
    for key, value in fixture.items():
        if key != "features.norm5.weight":
            np.testing.assert_array_equal(converted[key], value)
