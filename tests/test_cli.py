"""The command line: entry points, `--help`, config names, one-line errors for bad input.

Everything here fails (or prints help) before JAX starts, so each subprocess takes ~1 s.
"""

import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from crckd_jax import cli, modes
from crckd_jax import config as config_lib
from crckd_jax import configs as packaged_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = ROOT / "crckd_jax" / "configs"


def _python(*args, cwd=ROOT, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120, **kwargs)


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"crckd": "crckd_jax.cli:main",
                       "crckd-convert-weights": "crckd_jax.models.torch_import:convert_main"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


@pytest.mark.parametrize("command", [
    ["-m", "crckd_jax.cli", "--help"],
    [str(ROOT / "launch.py"), "--help"],
    # What the installed `crckd` script does: a main module without a docstring calls main().
    ["-c", "import sys; sys.argv[0] = 'crckd'; from crckd_jax.cli import main; main()",
     "--help"],
])
def test_help_lists_modes_and_flags(command, tmp_path):
    done = _python(*command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for text in ("Command line of crckd-jax", "predict  write W/predictions.csv",
                 "--config: Config file (path.py[:arg]) or packaged config name[:arg]: aptos,",
                 "--workdir: Folder for data",
                 "--mode: <prepare|train|eval|cv|table|predict|export>",
                 "table    the ablation table",
                 "--num_processes"):
        assert text in done.stdout, (text, done.stdout)


def test_packaged_config_names_and_files():
    assert packaged_configs.names() == ["aptos", "demo", "ham10000"]
    # The top-level configs/ folder has a thin file for every packaged config.
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.py")) == packaged_configs.names()
    assert packaged_configs.path("demo") == PACKAGE_CONFIGS / "demo.py"


@pytest.mark.parametrize("value, want", [
    ("demo", str(PACKAGE_CONFIGS / "demo.py")),
    ("demo:tiny", str(PACKAGE_CONFIGS / "demo.py") + ":tiny"),
    ("aptos:mt_ccd", str(PACKAGE_CONFIGS / "aptos.py") + ":mt_ccd"),
    ("configs/ham10000.py", "configs/ham10000.py"),  # a path (relative to the clone) stays
    (str(ROOT / "configs" / "demo.py") + ":tiny", str(ROOT / "configs" / "demo.py") + ":tiny"),
])
def test_resolve_config(value, want, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert packaged_configs.resolve(value) == want


def test_resolve_config_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(packaged_configs.UnknownConfigError,
                       match=r"^unknown config 'apots': expected a config file \(path.py\[:arg\]\) "
                             r"or one of the packaged configs aptos, demo, ham10000"):
        packaged_configs.resolve("apots:mt")
    with pytest.raises(packaged_configs.UnknownConfigError,
                       match=r"^config file not found: configs/demo.py \(a path, or one of the "
                             r"packaged configs aptos, demo, ham10000\)"):
        packaged_configs.resolve("configs/demo.py")  # not in this folder
    (tmp_path / "mine").write_text("")  # a bare word that names an existing file is a path
    assert packaged_configs.resolve("mine:x") == "mine:x"


def test_resolve_config_argument_rewrites_only_the_config_value(capsys):
    demo = str(PACKAGE_CONFIGS / "demo.py")
    argv = ["crckd", "--config", "demo:tiny", "--workdir", "w", "--config.train.epochs=2",
            "--mode=eval"]
    assert cli.resolve_config_argument(argv) == [
        "crckd", "--config", demo + ":tiny", "--workdir", "w", "--config.train.epochs=2",
        "--mode=eval"]
    assert cli.resolve_config_argument(["crckd", "--config=aptos", "--workdir=w"]) == [
        "crckd", f"--config={PACKAGE_CONFIGS / 'aptos.py'}", "--workdir=w"]
    assert cli.resolve_config_argument(["crckd", "-config", "demo"]) == [
        "crckd", "-config", demo]
    assert cli.resolve_config_argument(["crckd", "--", "--config", "demo"]) == [
        "crckd", "--", "--config", "demo"]
    with pytest.raises(SystemExit, match="^2$"):
        cli.resolve_config_argument(["crckd", "--config", "nope"])
    assert capsys.readouterr().err.startswith("error: unknown config 'nope'")


@pytest.mark.parametrize("config, message", [
    ("apots", "error: unknown config 'apots': expected a config file (path.py[:arg]) or one "
              "of the packaged configs aptos, demo, ham10000 (name[:arg])"),
    ("configs/nope.py", "error: config file not found: configs/nope.py (a path, or one of the "
                        "packaged configs aptos, demo, ham10000)"),
    ("demo:huge", "unknown config argument 'huge': expected '' or 'tiny'"),
    ("aptos:mt_cd", "unknown config argument 'mt_cd': expected one of baseline, mt, mt_ccd, "
                    "crckd"),
])
def test_bad_config_is_one_error_line(config, message, tmp_path):
    done = _python("-m", "crckd_jax.cli", "--config", config, "--workdir", str(tmp_path / "w"),
                   cwd=tmp_path)
    assert done.returncode == 2  # a config error
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists()


def test_config_name_runs_the_packaged_config(tmp_path):
    """`--config aptos` from another folder reaches the config's own validation (data.dir)."""
    done = _python(str(ROOT / "launch.py"), "--config", "aptos",
                   "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == ("error: config key 'data.dir' is '': expected the downloaded folder "
                           "for data.source='aptos'\n")


def test_top_level_config_files_equal_the_packaged_ones():
    for name in packaged_configs.names():
        top = ROOT / "configs" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"top_{name}", top)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        packaged = importlib.import_module(f"crckd_jax.configs.{name}")
        assert module.get_config is packaged.get_config
        arg = "tiny" if name == "demo" else "mt"
        assert module.get_config(arg).to_dict() == packaged.get_config(arg).to_dict()


def test_pretrained_of_unknown_kind_is_a_config_error(tmp_path):
    from crckd_jax import config as config_lib

    weights = tmp_path / "densenet121.h5"
    weights.write_bytes(b"")
    config = importlib.import_module("crckd_jax.configs.demo").get_config("tiny")
    with config.unlocked():
        config.model.pretrained = str(weights)
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            f"config key 'model.pretrained' is {str(weights)!r}: expected an existing "
            "torchvision DenseNet checkpoint file (.safetensors, .npz, .pth, .pt, .pth.tar)")):
        config_lib.validate(config)


def test_checkpoint_errors_are_one_error_line(tmp_path, monkeypatch, capsys):
    """A checkpoint that cannot be read (or does not fit the model) ends the run with its
    message. The training start-up is replaced by the checkpoint read train.py does."""
    from crckd_jax.models.torch_import import load_state_dict

    weights = tmp_path / "densenet_small.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    config = importlib.import_module("crckd_jax.configs.demo").get_config("tiny")
    with config.unlocked():
        config.model.pretrained = str(weights)
    monkeypatch.setattr(modes, "run", lambda mode, settings, folder, allow, share: load_state_dict(
        config.model.pretrained))
    with pytest.raises(SystemExit) as info:
        cli.execute("train", config, str(tmp_path / "w"), tracebacks=False)
    assert info.value.code == 4  # a checkpoint error
    assert capsys.readouterr().err.startswith(
        f"error: cannot read {weights} as a safetensors file: Error while deserializing header")


@pytest.mark.parametrize("name", ["aptos", "ham10000"])
def test_reference_argument_sets_the_authors_run(name):
    """`:reference` turns on every setting of config.REFERENCE_PROTOCOL, alone or with an
    ablation; the plain config keeps the scalable defaults."""
    packaged = importlib.import_module(f"crckd_jax.configs.{name}")
    plain, reference = packaged.get_config(""), packaged.get_config("reference")
    keys = lambda c: (c.train.batch_size, c.train.keep_partial_batch, c.model.bn_group_size,
                      c.model.reference_double_bn_update, c.optim.reset_lr_each_epoch,
                      c.memory.kind)
    assert keys(reference) == (64, True, 32, True, True, "bank")
    assert keys(plain) == (32, False, 0, False, False, "queue")
    both = packaged.get_config("mt_ccd,reference")
    assert both.loss.crp_weight == 0.0 and both.loss.ccd_weight == 0.1
    assert both.model.bn_group_size == 32
    assert reference.loss.crp_weight == 1.0
    with pytest.raises(config_lib.ConfigError, match="names 2 ablations"):
        packaged.get_config("mt,crckd")
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'refrence'"):
        packaged.get_config("refrence")
    with reference.unlocked():
        reference.data.dir, reference.model.pretrained = "/data", "none"
    config_lib.validate(reference)
    with reference.unlocked():
        reference.parallel.sync_batch_norm = True
    with pytest.raises(config_lib.ConfigError, match="'model.bn_group_size' is 32: expected 0 "
                                                     "with parallel.sync_batch_norm=True"):
        config_lib.validate(reference)


def test_a_run_config_that_fails_validation_is_named(tmp_path):
    """eval/predict/export read W/config.json: a bad value or a damaged file is one error
    line naming the file."""
    from crckd_jax import config as config_lib
    from crckd_jax.run_folder import RunFolder
    from crckd_jax.settings import Settings

    config = config_lib.default_config()
    config.train.batch_size = -3
    RunFolder(str(tmp_path)).write_config(Settings.from_dict(config.to_dict()))  # unchecked
    done = _python(str(ROOT / "launch.py"), "--workdir", str(tmp_path), "--mode", "export")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: config key 'train.batch_size' is -3: expected an integer >= 1 (config read "
        f"from {tmp_path / 'config.json'}, with the command line's overrides)")
    (tmp_path / "config.json").write_text("{not json")
    done = _python(str(ROOT / "launch.py"), "--workdir", str(tmp_path), "--mode", "predict")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{tmp_path / 'config.json'} is not valid JSON" in last


def test_orchestration_modules_do_not_import_each_other():
    """`train`, `cv`, `evaluate` and `predict` build on `trainer` / `inference`; only `cv`
    imports one of them (`train`, which it runs per fold)."""
    import ast

    package = pathlib.Path(cli.__file__).parent
    commands = {"train", "cv", "evaluate", "predict"}
    allowed = {"cv": {"train"}}
    for name in sorted(commands | {"trainer", "inference"}):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "crckd_jax":
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crckd_jax."):
                imported.add(node.module.split(".")[1])
        assert imported & commands <= allowed.get(name, set()), (name, imported & commands)


def test_training_imports_no_plotting_library():
    """matplotlib (and the report's t-SNE) load only when a report is written: ~0.8 s less
    start-up for every command."""
    done = _python("-c", "import sys, crckd_jax.cli, crckd_jax.train, crckd_jax.cv, "
                         "crckd_jax.evaluate, crckd_jax.predict; "
                         "print('matplotlib' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_config_file_that_does_not_load_is_one_error_line(tmp_path):
    """A syntax error, or code of the config file that fails as it loads: exit 2 and one
    `error:` line naming the file, no traceback."""
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    failing = tmp_path / "failing.py"
    failing.write_text("import no_such_module_of_crckd\n\ndef get_config():\n    pass\n")
    for path, message in ((broken, f"error: config file {broken}, line 1: invalid syntax"),
                          (failing, f"error: cannot load {failing}: ModuleNotFoundError: "
                                    "No module named 'no_such_module_of_crckd'")):
        done = _python(str(ROOT / "launch.py"), "--config", str(path), "--workdir",
                       str(tmp_path / "w"))
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [message]


def test_stderr_drops_only_the_tracebacks_of_closed_event_loops():
    """The command line's stderr: orbax's "Event loop is closed" tracebacks are dropped,
    also when several threads' pieces interleave; other lines, a progress bar's partial
    line and another exception's frames pass through as written."""
    import io

    from crckd_jax.cli import _WithoutClosedLoopTracebacks

    out = io.StringIO()
    stream = _WithoutClosedLoopTracebacks(out)
    frame = '  File "/usr/lib/python3.12/asyncio/base_events.py", line 837, in call_soon_threadsafe\n'
    stream.write("\r 50%|#####     | 3/6 [00:04<00:03]")
    assert out.getvalue() == "\r 50%|#####     | 3/6 [00:04<00:03]"  # not held back
    for piece in ("Traceback (most recent call last):\n", frame, "    self._check_closed()",
                  "    raise RuntimeError('Event loop is closed')", "Traceback (most recent "
                  "call last):\n", "RuntimeError", ": ", "Event loop is closed", "\n", frame,
                  "RuntimeError: Event loop is closed\n", '  File "x.py", line 1, in f\n',
                  "ValueError: bad\n", "error: the disk is full", "\n"):
        stream.write(piece)
    assert out.getvalue() == ("\r 50%|#####     | 3/6 [00:04<00:03]"
                              '  File "x.py", line 1, in f\nValueError: bad\n'
                              "error: the disk is full\n")
