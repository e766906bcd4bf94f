"""`--mode eval` on a trained run: the metrics of its newest checkpoint on the test (and
validation) split of its prepared fold, written to `<W>/eval.json`."""

from __future__ import annotations

from typing import Callable

import jax

from crckd_jax import metrics
from crckd_jax.run_folder import RunFolder
from crckd_jax.settings import Settings
from crckd_jax.trainer import load_trained


def evaluate_checkpoint(settings: Settings, folder: RunFolder,
                        log: Callable[[str], None] = print) -> dict:
    """Metrics of the latest checkpoint on the test (and validation) split -> eval.json,
    with the checkpoint's step."""
    trainer, state, step = load_trained(settings, folder, log=log)
    log(f"checkpoint step {step} ({folder.checkpoints})")
    results = {"checkpoint_step": step}
    for split in trainer.eval_splits:
        out = trainer.evaluate(state, split)
        results[split] = trainer.scores(out)
        log(f"{split}: {metrics.format_metrics(results[split])}")
        log(metrics.per_class_report(out["probs"], out["labels"], trainer.data.class_names))
    if jax.process_index() == 0:
        folder.write_json("eval.json", results)
    return results
