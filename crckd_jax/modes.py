"""What each `--mode` does with a run's settings and its run folder.

prepare, train, cv and table write the run folder and hold its lock (process 0; cv and table
processes started with `--share_workdir` hold it together); eval, predict and export read a
trained run and write only their own results.
"""

from __future__ import annotations

from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings

MODES = ("prepare", "train", "eval", "cv", "table", "predict", "export")


def run(mode: str, settings: Settings, folder: RunFolder,
        allow_config_change: bool = False, share_workdir: bool = False) -> None:
    """Runs `mode` (one of MODES) on `folder`; `share_workdir` (cv, table): together with
    the other processes started so on it, each unit trained by one of them."""
    # Imported here so that a bad flag or config fails before JAX starts.
    import jax

    from crckd_jax import cv, evaluate, inference, predict, table, train
    from crckd_jax.data import prepare

    if mode == "eval" and settings.eval.input:
        predict.evaluate_input(settings, folder)
    elif mode == "eval":  # the run's own split and model: with the run's settings
        folder.check_resumable(settings, allow_config_change, print)
        evaluate.evaluate_checkpoint(settings, folder)
    elif mode == "predict":
        predict.predict(settings, folder)
    elif mode == "export":
        inference.export(folder.root, teacher=settings.export.teacher,
                         checkpoint=settings.export.checkpoint)
    else:
        with folder.lock(mode, enabled=jax.process_index() == 0, shared=share_workdir):
            if mode == "prepare":
                prepare.prepare(settings, folder.root)
            elif mode == "train":
                train.train_and_evaluate(settings, folder,
                                         allow_config_change=allow_config_change)
            elif mode == "cv":
                cv.run_cv(settings, folder, allow_config_change=allow_config_change,
                          share=share_workdir)
            else:
                table.run_table(settings, folder, allow_config_change=allow_config_change,
                                share=share_workdir)
