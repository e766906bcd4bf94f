"""`--mode table`: the paper's table in one command, ablation rungs x folds x seeds.

Every unit (a rung's loss weights, one seed, one test fold) trains in
`W/<rung>/seed_<s>/fold_<k>/` on the data set prepared once in `W`, as a `train` run does:
resumable unit by unit and after a signal; a unit whose `summary.json` exists is done and
only read. At the end, per rung over all its units (population std, ddof 0):

* `W/table.json`: every cell (mean, std, n) and the units behind each row (folders
  relative to `W`);
* `W/table.csv`: one line per rung, view and metric;
* `W/table.md`: the paper's layout (rungs as rows, the metrics as columns, mean +- std),
  for the `final` and `mean_last_11` views, the embeddings' class separation (final student
  on the test fold, `crckd_jax.separation`), and a link to
* `W/table.png`: each metric's spread over the units, per rung (final view).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax

from crckd_jax import protocols
from crckd_jax.cv import run_units
from crckd_jax.metrics import METRIC_KEYS
from crckd_jax.run_folder import RunFolder
from crckd_jax.separation import SEPARATION_KEYS
from crckd_jax.settings import Settings
from crckd_jax.summary import MEAN_VIEW, finite, mean_std

TABLE_VIEWS = ("final", MEAN_VIEW)  # the views of the run summaries the table reports
FIGURE_FILE = "table.png"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One training run of the table."""

    rung: str
    seed: int
    fold: int

    def folder(self, table: RunFolder) -> RunFolder:
        return RunFolder(table.path(self.rung, f"seed_{self.seed}", f"fold_{self.fold}"),
                         data_dir=table.root)

    def settings(self, settings: Settings) -> Settings:
        """`settings` with this unit's loss weights (`protocols.ABLATIONS`), seed and fold."""
        consistency, ccd, crp = protocols.ABLATIONS[self.rung]
        loss = dataclasses.replace(settings.loss, consistency=consistency, ccd_weight=ccd,
                                   crp_weight=crp)
        return dataclasses.replace(settings, seed=self.seed, loss=loss).with_fold(self.fold)


def units(settings: Settings) -> list[Unit]:
    """Rungs x seeds x folds of `settings.table` and `data.folds`, rung by rung."""
    return [Unit(rung, seed, fold) for rung in settings.table.rung_list()
            for seed in settings.table.seed_list(settings.seed)
            for fold in settings.data.folds_to_run()]


def run_table(settings: Settings, folder: RunFolder, log: Callable[[str], None] = print,
              allow_config_change: bool = False, share: bool = False) -> dict | None:
    """Trains (or reads) every unit, then writes the table files; returns table.json's
    content. `settings` pass `config.require_initialisation`. `share`: with other
    processes (`cv.run_units`; None when another process is left to write the table)."""
    runs = {unit: (f"{unit.rung} seed {unit.seed} fold {unit.fold}",
                   unit.settings(settings), unit.folder(folder)) for unit in units(settings)}

    def tabulate(summaries: dict[Unit, dict]) -> dict:
        table = aggregate(summaries, folder)
        if jax.process_index() == 0:
            write(table, summaries, folder, log)
        return table

    return run_units(runs, tabulate, kind="unit", outcome="the table", folder=folder, log=log,
                     allow_config_change=allow_config_change, share=share)


def _unit_values(summary: dict) -> dict[str, float | None]:
    """A unit's final-view metrics and embedding separation, by key."""
    return {**{k: (summary.get("final") or {}).get(k) for k in METRIC_KEYS},
            **{k: (summary.get("embedding") or {}).get(k) for k in SEPARATION_KEYS}}


def aggregate(summaries: dict[Unit, dict], folder: RunFolder) -> dict:
    """{"rows": {rung: {"units": [...], view: {metric: cell}, "embedding": {key: cell}}},
    "rungs", "seeds", "folds"} over the units' summaries."""
    rungs = list(dict.fromkeys(u.rung for u in summaries))
    rows = {}
    for rung in rungs:
        mine = {u: s for u, s in summaries.items() if u.rung == rung}
        row = {"units": [{"seed": u.seed, "fold": u.fold,
                          "folder": os.path.relpath(u.folder(folder).root, folder.root)}
                         for u in mine]}
        for view in TABLE_VIEWS:
            row[view] = {k: mean_std([(s.get(view) or {}).get(k) for s in mine.values()])
                         for k in METRIC_KEYS}
        row["embedding"] = {k: mean_std([(s.get("embedding") or {}).get(k)
                                         for s in mine.values()]) for k in SEPARATION_KEYS}
        rows[rung] = row
    return {"rungs": rungs, "seeds": sorted({u.seed for u in summaries}),
            "folds": sorted({u.fold for u in summaries}), "rows": rows}


def _text(cell: dict) -> str:
    return "n/a" if not cell["n"] else f"{cell['mean']:.4f} ± {cell['std']:.4f}"


def markdown(table: dict) -> str:
    """The table in the paper's layout: a section per view, rungs as rows."""
    n = max(len(r["units"]) for r in table["rows"].values())
    lines = [f"# Ablation table: {', '.join(table['rungs'])}", "",
             f"Mean ± std over {n} units per rung (folds {table['folds']}, seeds "
             f"{table['seeds']}); test split of each unit's fold.", ""]
    for title, part, keys in ([(f"Test metrics, {view}", view, METRIC_KEYS)
                               for view in TABLE_VIEWS]
                              + [("Class separation of the final student's test embeddings "
                                  "(cosine)", "embedding", SEPARATION_KEYS)]):
        lines += [f"## {title}", "", "| rung | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        lines += [f"| {rung} | " + " | ".join(_text(row[part][k]) for k in keys) + " |"
                  for rung, row in table["rows"].items()]
        lines.append("")
    lines += [f"![each metric over the units, per rung]({FIGURE_FILE})", ""]
    return "\n".join(lines)


def csv_text(table: dict) -> str:
    lines = ["rung,view,metric,mean,std,n"]
    for rung, row in table["rows"].items():
        for part, keys in [(view, METRIC_KEYS) for view in TABLE_VIEWS] + [
                ("embedding", SEPARATION_KEYS)]:
            for k in keys:
                cell = row[part][k]
                mean, std = ("", "") if not cell["n"] else (repr(cell["mean"]), repr(cell["std"]))
                lines.append(f"{rung},{part},{k},{mean},{std},{cell['n']}")
    return "\n".join(lines) + "\n"


def write(table: dict, summaries: dict[Unit, dict], folder: RunFolder,
          log: Callable[[str], None]) -> None:
    """table.json, table.csv, table.md and table.png in `folder`."""
    from crckd_jax.report.table import plot_table  # matplotlib only when the table is written

    folder.write_json("table.json", table)
    folder.write_text("table.csv", csv_text(table))
    text = markdown(table)
    folder.write_text("table.md", text)
    per_unit = {u: _unit_values(s) for u, s in summaries.items()}
    values = {rung: {k: finite([v[k] for u, v in per_unit.items() if u.rung == rung])
                     for k in METRIC_KEYS + SEPARATION_KEYS} for rung in table["rungs"]}
    plot_table(values, folder.path(FIGURE_FILE))
    log(text)
