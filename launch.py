"""Command line: `python launch.py --config configs/demo.py --workdir W --mode prepare`.

`--config` is a config file (`path.py` or `path.py:arg`) whose keys can be overridden, e.g.
`--config.data.dir=/data/HAM10000`. Modes: prepare (build the data set, folds and
W/data_summary.json); train, eval, cv and predict are not available yet.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from crckd_jax import config as config_lib
from crckd_jax.data import prepare
from crckd_jax.data.sources import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for prepared data, folds and results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["prepare", "train", "eval", "cv", "predict"], "What to do."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        if _MODE.value != "prepare":
            raise SystemExit(
                f"error: --mode {_MODE.value} is not available yet; only --mode "
                "prepare works in this version"
            )
        prepare.prepare(config, _WORKDIR.value)
    except (DataError, config_lib.ConfigError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    app.run(main)
