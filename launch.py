"""Command line of crckd-jax from a clone: the same program, flags and output as the
installed `crckd` command (the code is crckd_jax/cli.py).

    python launch.py --config configs/demo.py --workdir W [--mode prepare|train|eval|cv|predict]
    python launch.py --config aptos:mt_ccd --workdir W --config.data.dir=/data/aptos2019

`--config` takes a config file (`path.py[:arg]`) or a packaged config's name (`demo`,
`ham10000`, `aptos`, with an optional `:arg`); `--config.KEY=VALUE` overrides a key.
`python launch.py --help` lists the modes and flags.
"""

from crckd_jax import cli

if __name__ == "__main__":
    cli.main()
