"""The settings table: defaults, validation, the manual's settings reference, the packaged
configs' arguments (ablations, `reference`), the core's configs built from it, and one
validation per command."""

import importlib.util
import pathlib
import re

import ml_collections
import pytest

from crckd_jax import cli, trainer, xla_options
from crckd_jax import config as config_lib
from crckd_jax import protocols
from crckd_jax.configs import path as packaged_config_path
from crckd_jax.distillation import ContrastConfig
from crckd_jax.objective import LossConfig
from crckd_jax.step import StepConfig
from crckd_jax.settings import Settings
from tools import settings_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULTS = {s.key: s.default for s in config_lib.SETTINGS}


def flat(config) -> dict:
    return config_lib.flatten(config)


def load_config(file: pathlib.Path, arg: str = ""):
    """`get_config(arg)` of the config file `file`, loaded as the command line loads it."""
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_default_config_is_the_table():
    """Every key of the table, and no other, with its default (and its type)."""
    defaults = flat(config_lib.default_config())
    assert sorted(defaults) == sorted(config_lib.KEYS)
    for key, value in DEFAULTS.items():
        assert defaults[key] == value and type(defaults[key]) is type(value), key
    assert len(set(config_lib.KEYS)) == len(config_lib.KEYS)


@pytest.mark.parametrize("setting", config_lib.SETTINGS, ids=lambda s: s.key)
def test_every_default_passes_its_own_rule(setting):
    assert config_lib._type_ok(setting.default, setting.rule.kind)
    assert setting.rule.ok(setting.default)
    assert setting.help and "\n" not in setting.help


def valid_config():
    config = config_lib.default_config()
    config.data.source = "synthetic"
    return config


@pytest.mark.parametrize("key, value, message", [
    ("data.image_size", 8, "config key 'data.image_size' is 8: expected an integer in "
                           "[16, 4096]"),
    ("train.epochs", "many", "config key 'train.epochs' is 'many': expected an integer >= 1"),
    ("train.epochs", True, "config key 'train.epochs' is True: expected an integer >= 1"),
    ("memory.temperature", 0.0, "config key 'memory.temperature' is 0.0: expected a number "
                                "> 0.0"),
    ("data.val_fraction", 0.9, "config key 'data.val_fraction' is 0.9: expected a number in "
                               "[0.0, 0.5]"),
    ("parallel.backend", "pjit", "config key 'parallel.backend' is 'pjit': expected one of "
                                 "'shard_map', 'pmap'"),
    ("model.name", "resnet50", "config key 'model.name' is 'resnet50': expected one of "
                               "'densenet121', 'densenet169', 'densenet201', 'densenet_small', "
                               "'densenet_tiny'"),
    ("data.folds", "0,x", "config key 'data.folds' is '0,x': expected comma-separated fold "
                          'numbers such as "0,2", or ""'),
    ("export.teacher", "yes", "config key 'export.teacher' is 'yes': expected True or False"),
])
def test_validation_names_the_key_and_what_was_expected(key, value, message):
    config_lib.validate(valid_config())
    as_dict = valid_config().to_dict()
    section, name = key.split(".")
    as_dict[section][name] = value  # as a config.json could hold it
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(ml_collections.ConfigDict(as_dict))
    assert str(info.value) == message


def test_unknown_and_missing_keys_are_named():
    config = valid_config()
    config.data.extra = 1
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(config)
    assert str(info.value) == (f"unknown config key 'data.extra'; known keys: "
                               f"{', '.join(config_lib.KEYS)}")
    as_dict = valid_config().to_dict()
    del as_dict["memory"]["queue_size"]
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(ml_collections.ConfigDict(as_dict))
    assert str(info.value) == "missing config key 'memory.queue_size': expected an integer >= 1"


def test_the_manual_lists_the_settings_table():
    manual = (ROOT / "docs" / "usage.md").read_text()
    assert settings_reference.with_table(manual) == manual, (
        "docs/usage.md's settings table is not the table of crckd_jax/settings.py; "
        "regenerate it with: python -m tools.settings_reference docs/usage.md")


def test_the_settings_reference_has_a_row_per_key():
    rows = settings_reference.markdown().splitlines()[2:]
    assert [re.match(r"\| `([^`]+)` \|", row).group(1) for row in rows] == list(config_lib.KEYS)
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 5 for row in rows)  # four cells each


# --- the packaged configs' arguments ------------------------------------------------------

ABLATION_WEIGHTS = {  # (consistency, ccd_weight, crp_weight)
    "": (1.0, 0.1, 1.0), "crckd": (1.0, 0.1, 1.0), "mt_ccd": (1.0, 0.1, 0.0),
    "mt": (1.0, 0.0, 0.0), "baseline": (0.0, 0.0, 0.0)}


@pytest.mark.parametrize("file", ["configs/aptos.py", "configs/ham10000.py"])
@pytest.mark.parametrize("ablation", list(ABLATION_WEIGHTS))
@pytest.mark.parametrize("reference", [False, True])
def test_config_arguments_set_the_loss_weights_and_the_reference_protocol(
        file, ablation, reference):
    """`configs/<name>.py:<ablation>[,reference]` changes the three loss weights and, with
    `reference`, exactly the keys of REFERENCE_PROTOCOL; every other key keeps its default
    or the data set's value."""
    arg = ",".join(filter(None, [ablation, "reference" if reference else ""]))
    config = load_config(ROOT / file, arg)
    assert config.is_locked
    loss = config.loss
    assert (loss.consistency, loss.ccd_weight, loss.crp_weight) == ABLATION_WEIGHTS[ablation]
    protocol = {f"{s}.{k}": v for (s, k), v in protocols.REFERENCE_PROTOCOL.items()}
    weights = {"loss.consistency", "loss.ccd_weight", "loss.crp_weight"}
    dataset = {"data.source", "data.split_seed"}
    for key, value in flat(config).items():
        if key in protocol and reference:
            assert value == protocol[key], key
        elif key not in weights | dataset:
            assert value == DEFAULTS[key], key
    # The packaged module and the file at the top of a clone are the same config.
    name = pathlib.Path(file).stem
    assert load_config(packaged_config_path(name), arg).to_dict() == config.to_dict()


def test_config_arguments_are_checked():
    aptos = ROOT / "configs" / "aptos.py"
    with pytest.raises(config_lib.ConfigError, match="names 2 ablations"):
        load_config(aptos, "mt,baseline")
    with pytest.raises(config_lib.ConfigError) as info:
        load_config(aptos, "mt_crp")
    assert str(info.value) == ("unknown config argument 'mt_crp': expected one of baseline, "
                               "mt, mt_ccd, crckd, or 'reference'")


# --- the core's configs, built from the table -----------------------------------------------

def test_factories_read_the_table_defaults():
    config = config_lib.default_config()
    settings = lambda: Settings.from_dict(config.to_dict())  # noqa: E731
    assert ContrastConfig.from_settings(settings().memory) == ContrastConfig(
        num_positives=20, num_negatives=4096, temperature=0.07, momentum=0.5, z_momentum=0.0)
    assert LossConfig.from_settings(settings().loss) == LossConfig(
        consistency=1.0, rampup_epochs=30, ccd_weight=0.1, ccd_weight_late=0.1 * 0.1,
        crp_weight=1.0, begin_epoch=20)  # the reference preset: ccd weight squared late
    config.loss.preset = "paper"
    paper = LossConfig.from_settings(settings().loss)
    assert (paper.ccd_weight_late, paper.begin_epoch) == (0.1, 0)
    step = StepConfig.from_settings(settings(), steps_per_epoch=7, axis_name="data")
    assert step._replace(loss=None, contrast=None) == StepConfig(
        loss=None, contrast=None, ema_decay=0.99, steps_per_epoch=7,
        consistency_divisor=32, teacher_bn="train", teacher_rotate=True,
        running_stats_of_first_device=False, axis_name="data")
    config.model.bn_group_size = 16
    assert StepConfig.from_settings(settings(), steps_per_epoch=7,
                                    axis_name=None).running_stats_of_first_device


# --- one validation per command -------------------------------------------------------------

class _Stop(Exception):
    pass


def test_a_cv_command_checks_its_config_once(tmp_path, monkeypatch):
    """`--mode cv` down to the first fold's data: one `validate` and one
    `require_initialisation` (the command line's), none per fold."""
    calls = []
    for name in ("validate", "require_initialisation"):
        check = getattr(config_lib, name)
        monkeypatch.setattr(config_lib, name,
                            lambda c, name=name, check=check: calls.append(name) or check(c))

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(xla_options, "enable_compilation_cache", lambda directory: None)
    monkeypatch.setattr(trainer, "load_data", stop)
    config = load_config(packaged_config_path("demo"), "tiny")
    with pytest.raises(SystemExit):  # _Stop: an unexpected error
        cli.execute("cv", config, str(tmp_path / "w"), tracebacks=True)
    assert calls == ["validate", "require_initialisation"]
