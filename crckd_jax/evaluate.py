"""`--mode eval` on a trained run: the metrics of its newest checkpoint on the test (and
validation) split of its prepared fold, written to `<workdir>/eval.json`."""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import ml_collections

from crckd_jax import metrics
from crckd_jax.trainer import load_trained


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        log: Callable[[str], None] = print) -> dict:
    """Metrics of the latest checkpoint on the test (and validation) split -> eval.json."""
    trainer, state = load_trained(config, workdir, log=log)
    results = {}
    for split in trainer.eval_splits:
        out = trainer.evaluate(state, split)
        results[split] = trainer.scores(out)
        log(f"{split}: {metrics.format_metrics(results[split])}")
        log(metrics.per_class_report(out["probs"], out["labels"], trainer.data.class_names))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results
