"""``prepare-data --force`` replaces a prepared workspace in one swap that no kill leaves half done.

The new index, cache and recipe (and a regenerated synthetic set) are built in a staging folder
``WS/.prepare-<run id>/`` while the old workspace stays as it was: a kill then leaves the old
workspace, and the next command removes the staging folder (it *undoes*). When everything new
exists, a journal ``WS/.prepare-swap.json`` is written: the commit point. The swap then moves
the old stage outputs, ``data/`` and ``recipe.yaml`` into ``WS/.retired-<run id>/``, moves the
new ones into place, writes the manifest's new ``dataset`` entry (the old stage runs in the
ledger are marked ``retired_by`` this run), removes the journal and deletes the retired folder.
A kill after the journal leaves a swap that the next command *finishes*. Every step of
:func:`finish_swap` can run again after a kill, and every command goes through
:func:`settle_interrupted_swap` (the command runner calls it first, holding the workspace alone
for the moment it takes), which says in one line which it did.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rich.markup import escape

from dmdl_cli.atomic import atomic_write_json
from dmdl_cli.console import log
from dmdl_cli.workspace import RECIPE_FILE, STAGE_DIRS, Workspace

JOURNAL = ".prepare-swap.json"
STAGING = ".prepare-"  # + run id: where the new workspace is built
RETIRED = ".retired-"  # + run id: where the old one goes before it is deleted
#: what a staging folder holds and the swap puts in place of the old
REPLACED = ("data", RECIPE_FILE, "synthetic")
#: what the swap removes: every stage's output folder (the data is replaced instead)
REMOVED = tuple(name for name in STAGE_DIRS if name != "data")


def staging_folder(ws: Workspace, run_id: str) -> Path:
    return ws.root / f"{STAGING}{run_id}"


def swap(ws: Workspace, run_id: str, dataset: dict[str, Any], outputs: list[dict[str, Any]]) -> None:
    """Replace the workspace by what :func:`staging_folder` holds (the caller holds the
    workspace alone): write the journal, then :func:`finish_swap`."""
    journal = {"run": run_id, "pid": os.getpid(), "dataset": dataset, "outputs": outputs}
    atomic_write_json(ws.root / JOURNAL, journal)  # from here on the swap goes forward
    finish_swap(ws, journal)


def finish_swap(ws: Workspace, journal: dict[str, Any], *, finished_by: str | None = None) -> None:
    """Carry out the swap the journal describes, from wherever a kill stopped it."""
    run_id = journal["run"]
    staging, retired = staging_folder(ws, run_id), ws.root / f"{RETIRED}{run_id}"
    retired.mkdir(exist_ok=True)
    for name in REMOVED:
        if (ws.root / name).exists():
            os.replace(ws.root / name, retired / name)
    for name in REPLACED:
        if (staging / name).exists():  # not moved in yet: the old one (if any) goes first
            if (ws.root / name).exists():
                os.replace(ws.root / name, retired / name)
            os.replace(staging / name, ws.root / name)
    ws.manifest["dataset"] = journal["dataset"]
    for entry in ws.runs():
        if entry.get("stage") != "prepare-data" and "retired_by" not in entry:
            ws.amend_run(entry, retired_by=run_id)  # its outputs are gone
    if finished_by is not None:
        prepare = next((r for r in ws.runs("prepare-data") if r.get("id") == run_id), None)
        if prepare is not None:
            ws.amend_run(prepare, status="done", ended=prepare.get("ended"),
                         outputs=journal["outputs"],
                         note=f"killed during its swap; `dmdl {finished_by}` finished it")
    ws.write_manifest()
    (ws.root / JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(retired, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def leftovers(ws: Workspace) -> list[Path]:
    """The journal (or its temporary file), staging and retired folders a killed
    ``prepare-data --force`` left."""
    return sorted([*ws.root.glob(JOURNAL), *ws.root.glob(f".{JOURNAL}.*.tmp"),
                   *ws.root.glob(f"{STAGING}*"), *ws.root.glob(f"{RETIRED}*")])


def settle_interrupted_swap(ws: Workspace, command: str) -> None:
    """Finish or undo what a killed ``prepare-data --force`` left in ``ws``, saying which in
    one line; nothing to do (one ``glob``) in a workspace without leftovers."""
    if not ws.root.is_dir() or not leftovers(ws):
        return
    with ws.locked():  # alone: refused, naming it, while that prepare-data still runs
        journal_path = ws.root / JOURNAL
        if journal_path.is_file():
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            finish_swap(ws, journal, finished_by=command)
            log(f"[yellow]finished the swap of an interrupted `prepare-data --force` (pid "
                f"{journal.get('pid')}): {escape(str(ws.root))} holds its new index and cache; "
                f"the previous stage outputs are removed[/]")
            return
        undone = []
        for path in leftovers(ws):
            if not path.is_dir():  # the journal's temporary file: killed while writing it
                path.unlink(missing_ok=True)
                continue
            if path.name.startswith(STAGING):  # killed before its journal: the old workspace stays
                run_id = path.name[len(STAGING):]
                prepare = next((r for r in ws.runs("prepare-data") if r.get("id") == run_id), None)
                if prepare is not None and prepare.get("status") == "running":
                    ws.amend_run(prepare, status="interrupted",
                                 error=f"killed before its swap; `dmdl {command}` undid it")
                undone.append(run_id)
            shutil.rmtree(path, ignore_errors=True)
        if undone:
            ws.write_manifest()
            log(f"[yellow]undid an interrupted `prepare-data --force`: {escape(str(ws.root))} is "
                f"as it was before it (the index and cache it was building are removed)[/]")
        else:  # killed while deleting what it had retired: the swap itself was complete
            log(f"[yellow]removed what an interrupted `prepare-data --force` left in "
                f"{escape(str(ws.root))} (its swap was complete)[/]")
