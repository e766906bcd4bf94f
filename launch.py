"""Command line of crckd-jax.

    python launch.py --config configs/demo.py --workdir W [--mode train]

`--config` is a config file (`path.py` or `path.py:arg`) whose keys can be overridden, e.g.
`--config.data.dir=/data/HAM10000 --config.train.epochs=5`. Modes:
  prepare  build the data set, the folds and W/data_summary.json
  train    prepare if needed, then train fold `data.fold` in W (resumes from W/checkpoints)
  eval     evaluate the latest checkpoint of W on the test (and validation) split
  cv       train every fold of `data.folds` in W/fold_<k>, then W/cv_summary.{json,md}
  predict  write W/predictions.csv for the images of `predict.input`
"""

from absl import app, flags, logging
from ml_collections import config_flags

from crckd_jax import config as config_lib
from crckd_jax.data.sources import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for data, checkpoints and results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["prepare", "train", "eval", "cv", "predict"], "What to do."
)
flags.mark_flags_as_required(["config", "workdir"])


def run(mode: str, config, workdir: str) -> None:
    # Imported here so that a bad flag or config fails before JAX starts.
    from crckd_jax import cv, predict, train
    from crckd_jax.data import prepare

    if mode == "prepare":
        prepare.prepare(config, workdir)
    elif mode == "train":
        train.train_and_evaluate(config, workdir)
    elif mode == "eval":
        train.evaluate_checkpoint(config, workdir)
    elif mode == "cv":
        cv.run_cv(config, workdir)
    else:
        predict.predict(config, workdir)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error for a config override of an unknown key."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        known = config_lib.RULES
        for arg in argv[1:]:
            key = arg.removeprefix("--config.").split("=")[0]
            if arg.startswith("--config.") and key not in known:
                raise SystemExit(f"error: unknown config key {key!r} (in {arg}); known keys: "
                                 f"{', '.join(known)}") from e
        raise SystemExit(f"error: {e}") from e
    except flags.Error as e:  # e.g. a value of the wrong type: names the flag and value
        raise SystemExit(f"error: {e}") from e


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        run(_MODE.value, config, _WORKDIR.value)
    except (DataError, config_lib.ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
