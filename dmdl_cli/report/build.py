"""The ``dmdl report`` stage: read workspaces, print tables, write tables and figures.

One workspace: its per-epoch table, its table of label-free criteria per model and its
evaluation table on the console; ``per_epoch.{md,csv}``, ``criteria.{md,csv}``,
``evaluations.{md,csv}`` and the PNGs of :mod:`dmdl_cli.report.figures` under ``--out``
(default ``WS/report``). Several: the comparison table (mean ± std over the runs of each recipe
variant) on the console; ``comparison.{md,csv}``, the overlaid figures, and each workspace's own
report in ``<out>/<label>/`` (default ``out``: ``report/`` in the workspaces' common folder).
"""
from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape

from dmdl_cli.atomic import atomic_write_text
from dmdl_cli.console import console, log
from dmdl_cli.errors import DmdlError
from dmdl_cli.report.logs import WorkspaceRecord, read_workspace
from dmdl_cli.workspace import MANIFEST, Workspace
from dmdl_cli.report.tables import (
    TableData,
    comparison_table,
    criteria_table,
    epoch_table,
    evaluation_table,
)


def labels_for(paths: list[Path]) -> list[str]:
    """Short distinct names: folder names, else as many trailing parts as tell them apart."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        names = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(names)) == len(names):
            return names
    raise DmdlError("the same workspace is given twice: give each workspace once")


def _write_table(table: TableData, out: Path, stem: str) -> list[Path]:
    if not table.rows:
        return []
    atomic_write_text(out / f"{stem}.md", table.markdown())
    atomic_write_text(out / f"{stem}.csv", table.csv())
    return [out / f"{stem}.md", out / f"{stem}.csv"]


def workspace_report(record: WorkspaceRecord, out: Path, show: bool) -> list[Path]:
    """Tables and figures of one workspace under ``out``; the tables on the console if ``show``."""
    out.mkdir(parents=True, exist_ok=True)
    epochs, evals = epoch_table(record), evaluation_table(record)
    title = f"{record.label}: label-free criteria per model (docs/selection.md)"
    criteria = criteria_table(title, record.stages)
    if show:
        for table in (epoch_table(record, compact=True),
                      criteria_table(title, record.stages, compact=True), evals):
            if table.rows:
                console.print(table.rich())
    written = (_write_table(epochs, out, "per_epoch") + _write_table(criteria, out, "criteria")
               + _write_table(evals, out, "evaluations"))
    from dmdl_cli.report import figures  # matplotlib: only once the workspaces were read

    for draw in (figures.training_curves, figures.pseudo_label_curves, figures.selection_curves,
                 figures.cmc_curves):
        path = draw(record, out)
        if path is not None:
            written.append(path)
    return written


def default_out(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0] / "report"
    return Path(os.path.commonpath([str(p.resolve()) for p in paths])) / "report"


def report(workspaces: list[Path], out: Path | None = None) -> list[Path]:
    """Write the report of ``workspaces``; returns the files written."""
    if not workspaces:
        raise DmdlError("give at least one workspace: `dmdl report WS [WS ...]`")
    paths = [Path(w) for w in workspaces]
    for path in paths:  # a manifest of another format version: one line, as in every command
        if (path / MANIFEST).is_file():
            Workspace.open(path)
    records = [read_workspace(p, label) for p, label in zip(paths, labels_for(paths))]
    out = (out or default_out(paths)).resolve()
    if len(records) == 1:
        written = workspace_report(records[0], out, show=True)
    else:
        table = comparison_table(records)  # a workspace without evaluations has its row too
        console.print(table.rich())
        written = _write_table(table, out, "comparison")
        out.mkdir(parents=True, exist_ok=True)
        from dmdl_cli.report import figures

        written += figures.compare_curves(records, out)
        for rec in records:
            written += workspace_report(rec, out / rec.label.replace("/", "_"), show=False)
    for path in written:
        log(f"wrote {escape(str(path))}")
    log(f"report of {len(records)} workspace{'s' if len(records) > 1 else ''}: {escape(str(out))}")
    return written
