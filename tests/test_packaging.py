"""The package: version, declared dependencies, and (slow) the wheel `pip install .` builds."""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import crckd_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(line: str) -> str:
    return re.split(r"[\[<>=!~; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_version_is_the_single_source_pyproject_reads():
    project = PYPROJECT["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "crckd_jax.__version__"}
    # setuptools reads the attribute statically (an assignment of a literal): the same value.
    tree = ast.parse((ROOT / "crckd_jax" / "__init__.py").read_text())
    literal = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
               and [t.id for t in node.targets] == ["__version__"]]
    assert literal == [crckd_jax.__version__]
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", crckd_jax.__version__)


def test_requirements_lock_pyproject():
    """requirements.txt pins (==) the runtime dependencies and the test extra; every pin is
    inside pyproject's range."""
    from packaging.requirements import Requirement  # pip's (and setuptools') own parser

    lines = [line.split("#")[0].strip() for line in
             (ROOT / "requirements.txt").read_text().splitlines()]
    pins = {}
    for line in filter(None, lines):
        name, version = line.split("==")
        pins[_requirement_name(name)] = version
    declared = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]
                + PYPROJECT["project"]["optional-dependencies"]["test"]]
    assert {_requirement_name(r.name) for r in declared} | {"jaxlib"} == set(pins)
    for requirement in declared:
        version = pins[_requirement_name(requirement.name)]
        assert requirement.specifier.contains(version), (str(requirement), version)


def test_accelerator_and_torch_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    jax_range = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("jax"))
    for extra in ("cuda13", "cuda12", "tpu"):
        assert extras[extra] == [jax_range.replace("jax", f"jax[{extra}]", 1)]
    assert [_requirement_name(r) for r in extras["torch"]] == ["torch", "torchvision"]


def _pip(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_wheel_contents_and_install(tmp_path):
    """`pip wheel .` builds the package alone (configs and py.typed inside; no tests,
    benchmarks or top-level configs), and the wheel installed elsewhere imports and finds its
    configs by name."""
    # Built from a copy, as from a fresh clone: setuptools writes build/ and *.egg-info into
    # the source folder, and a stale build/ of the checkout could leak into the wheel.
    source = tmp_path / "clone"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs",
        "workdirs"))
    done = _pip("wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"crckd_jax-{crckd_jax.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"crckd_jax-{crckd_jax.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"crckd_jax", info}, top_level
    for expected in ("crckd_jax/__init__.py", "crckd_jax/py.typed", "crckd_jax/cli.py",
                     "crckd_jax/configs/__init__.py", "crckd_jax/configs/demo.py",
                     "crckd_jax/configs/ham10000.py", "crckd_jax/configs/aptos.py",
                     "crckd_jax/data/pipeline.py", "crckd_jax/models/torch_import.py"):
        assert expected in names, expected
    assert not [n for n in names if re.search(r"(^|/)(tests|benchmarks|docs)/|launch\.py", n)]
    assert f"\nVersion: {crckd_jax.__version__}\n" in metadata
    for extra in ("cuda13", "cuda12", "tpu", "torch", "test"):
        assert f"Provides-Extra: {extra}\n" in metadata
    assert "crckd = crckd_jax.cli:main" in entry_points
    assert "crckd-convert-weights = crckd_jax.models.torch_import:convert_main" in entry_points

    target = tmp_path / "site"
    done = _pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # Run from an empty folder with only the installed copy on the path (not the clone).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    code = ("import crckd_jax, crckd_jax.configs as c; "
            "print(crckd_jax.__version__, crckd_jax.__file__, c.resolve('aptos:mt'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    version, location, resolved = done.stdout.split()
    assert version == crckd_jax.__version__
    assert pathlib.Path(location).is_relative_to(target)
    assert resolved == f"{target / 'crckd_jax' / 'configs' / 'aptos.py'}:mt"
    done = subprocess.run([sys.executable, "-m", "crckd_jax.cli", "--help"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0 and "--workdir" in done.stdout, done.stderr
