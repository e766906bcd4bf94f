"""The packaged configs: one module per job, each with `get_config(arg: str = "")`.

They are config files in ml_collections' sense, so the command line takes either a path
(`--config configs/aptos.py:mt_ccd`, the thin files at the top of a clone re-export these
modules) or a packaged config's name (`--config aptos:mt_ccd`), which `resolve` turns into the
path of the module file here before the flags are parsed.
"""

from __future__ import annotations

import os
import pathlib

_DIR = pathlib.Path(__file__).resolve().parent


class UnknownConfigError(ValueError):
    """A `--config` value is neither an existing config file nor a packaged config's name."""


def names() -> list[str]:
    """Names of the packaged configs (the module files of this package), sorted."""
    return sorted(p.stem for p in _DIR.glob("*.py") if not p.stem.startswith("_"))


def path(name: str) -> pathlib.Path:
    """The file of packaged config `name`; UnknownConfigError listing the names otherwise."""
    if name not in names():
        raise UnknownConfigError(
            f"unknown config {name!r}: expected a config file (path.py[:arg]) or one of the "
            f"packaged configs {', '.join(names())} (name[:arg])")
    return _DIR / f"{name}.py"


def resolve(value: str) -> str:
    """A `--config` value as the path ml_collections loads: `name[:arg]` -> `/.../name.py[:arg]`.

    A value whose file part contains a path separator or ends in `.py` is a path and is
    returned as is once the file exists; so is a bare word naming an existing file that is
    not a packaged config. Anything else must be a packaged config's name. Raises
    UnknownConfigError (a missing file or an unknown name, with the known names).
    """
    file, colon, arg = value.partition(":")
    is_path = os.sep in file or "/" in file or file.endswith(".py")
    if is_path or (file not in names() and os.path.isfile(file)):
        if not os.path.isfile(file):
            raise UnknownConfigError(
                f"config file not found: {file} (a path, or one of the packaged configs "
                f"{', '.join(names())})")
        return value
    return f"{path(file)}{colon}{arg}"
