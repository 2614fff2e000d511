"""Stage `prepare-data`: index a raw data set, check its images, build the image cache.

Writes ``WS/data/index.csv``, ``WS/data/cache-HxW.u8`` (with its integrity record),
``WS/recipe.yaml`` and the manifest's ``dataset`` entry. Re-running on an unchanged source with
the same image size checks the cache's sha256 and does nothing more; a damaged or missing index
or cache is rebuilt by that plain re-run. ``--force`` over a prepared workspace builds the new
index, cache and recipe beside it and swaps them in for the old ones and the stage outputs
(``data/swap.py``), so a failed or killed rebuild leaves the old workspace or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from rich.markup import escape
from rich.table import Table

from dmdl_cli.atomic import atomic_write_text, remove_temporaries, sha256_file
from dmdl_cli.console import console, log
from dmdl_cli.data.cache import (
    build_cache,
    cache_record,
    cache_resize,
    read_record,
    record_checksums,
    verify_cache,
    write_record,
)
from dmdl_cli.data.index import INFRARED, VISIBLE, IndexTable, index_to_csv, write_index
from dmdl_cli.data.sources import find_bad_images, read_source
from dmdl_cli.data.swap import JOURNAL, staging_folder, swap
from dmdl_cli.datasets import dataset_record
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import Recipe, SyntheticRecipe
from dmdl_cli.workspace import RECIPE_FILE, STAGE_DIRS, StageRun, Workspace

if TYPE_CHECKING:  # the context layer sits above this one: prepare-data only reads its fields
    from dmdl_cli.context import StageContext

SYNTHETIC_STAMP = "dmdl-synthetic.json"
MAX_LISTED = 10


def source_fingerprint(table: IndexTable, files: Sequence[str] | None = None) -> str:
    """sha256 over the index content and every image's size and modification time (``files``:
    where the images are now, when that is not yet the index's paths)."""
    digest = hashlib.sha256(index_to_csv(table).encode())
    for path in table.paths if files is None else files:
        st = os.stat(path)
        digest.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _synthetic_root(ws: Workspace, root: Path | None, settings: SyntheticRecipe, force: bool,
                    staging: Path | None = None) -> Path:
    """Generate the synthetic set of the recipe's ``synthetic:`` section once (into a temp
    folder, then renamed) and reuse it while the section is unchanged; returns where it is.
    A set in the workspace that ``--force`` regenerates is generated into ``staging`` (the
    swap puts it in place: the old workspace keeps its own until then)."""
    from dmdl_cli.data.synthetic import generate

    target = Path(root).expanduser().resolve() if root else ws.root / "synthetic"
    # the generator's settings are part of the request: a set written with other settings (or
    # by an older generator with other defaults) is not silently reused
    wanted = {"ids": settings.ids, "seed": settings.seed, "config": settings.generator_settings()}
    stamp = target / SYNTHETIC_STAMP
    if stamp.is_file():
        if _stamped_request(stamp) == wanted:
            return target
        if not force:
            raise DmdlError(
                f"{target} holds a synthetic set made with other --ids/--seed (synthetic.ids, "
                f"synthetic.seed) or generator settings ({stamp.read_text().strip()}): pass "
                f"--force to regenerate it or another --root"
            )
    elif target.exists() and any(target.iterdir()):
        raise DmdlError(f"{target} exists and is not a dmdl synthetic set: choose another --root")
    if staging is not None and target == ws.root / "synthetic":
        target = staging / "synthetic"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        summary = generate(tmp, config=settings)
        (tmp / SYNTHETIC_STAMP).write_text(json.dumps({"request": wanted, "summary": summary}, default=str))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"generated the synthetic set in {escape(str(target))} ({time.perf_counter() - start:.1f} s)")
    return target


def _stamped_request(stamp: Path) -> dict[str, Any] | None:
    """The request a synthetic set was generated for; a set stamped before ids were a recipe
    key recorded ``ids: null`` for the default count."""
    request = json.loads(stamp.read_text()).get("request")
    if isinstance(request, dict) and request.get("ids") is None:
        request = {**request, "ids": SyntheticRecipe().ids}
    return request


def summary_table(table: IndexTable, title: str) -> Table:
    """Images and identities per split x modality x camera."""
    out = Table(title=title)
    for name in ("split", "modality", "camera", "images", "identities"):
        out.add_column(name, justify="right" if name in ("images", "identities") else "left")
    for split in ("train", "test"):
        for modality, mname in ((VISIBLE, "visible"), (INFRARED, "infrared")):
            rows = table.rows(split=split, modality=modality)
            if len(rows) == 0:
                continue
            for cam in np.unique(table.cams[rows]):
                sel = rows[table.cams[rows] == cam]
                out.add_row(split, mname, str(cam), str(len(sel)), str(len(np.unique(table.pids[sel]))))
            out.add_row(split, f"[bold]{mname}[/]", "all", f"[bold]{len(rows)}[/]",
                        f"[bold]{len(np.unique(table.pids[rows]))}[/]", end_section=True)
    return out


def prepare_data(
    ctx: "StageContext",
    *,
    dataset: str,
    root: Path | None,
    trial: int = 1,
    force: bool = False,
    skip_bad_images: bool = False,
) -> None:
    """Index, check and cache the data set (the synthetic set is generated from the recipe's
    ``synthetic:`` section) in the context the command runner built: it holds the workspace
    alone, and ``ctx.ledger`` is the command's ledger entry."""
    ws, recipe, run = ctx.ws, ctx.recipe, ctx.ledger
    previous = ws.dataset
    left = [*remove_temporaries(ws.root), *remove_temporaries(ws.root / "data")]
    if left:  # a killed prepare-data's half-written cache would keep the disk full
        log(f"removed {len(left)} temporary files a killed command left "
            f"({', '.join(sorted(ws.rel(p) for p in left))})")
    record = dataset_record(dataset)
    if not record.generated and root is None:
        raise DmdlError(f"--root is required for data set '{dataset}': the raw data set folder")
    root = Path(root).expanduser().resolve() if root else ws.root / "synthetic"
    identity = {"name": dataset, "root": str(root), "trial": trial if record.trials else None}
    # --force over a prepared workspace: everything new is built beside it, then swapped in
    staging = staging_folder(ws, run.entry["id"]) if previous and force else None
    try:
        _prepare(ws, recipe, run, identity, previous, force, skip_bad_images, staging)
    except BaseException as err:
        if staging is None or (ws.root / JOURNAL).exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # the old workspace stays as it was
        if type(err) is DmdlError:  # a file of the new workspace: named where it was to go
            raise DmdlError(str(err).replace(str(staging), str(ws.root))) from None
        raise


def _prepare(ws: Workspace, recipe: Recipe, run: StageRun, identity: dict[str, Any],
             previous: dict[str, Any] | None, force: bool, skip_bad_images: bool,
             staging: Path | None) -> None:
    dataset = identity["name"]
    root, table = _read_dataset(ws, recipe, identity, previous, force, staging)
    # the index names the images where they will be (a regenerated synthetic set: in place)
    indexed = _relocated(table, staging / "synthetic", root) if _in(table, staging) else table
    fingerprint = source_fingerprint(indexed, files=table.paths)
    if ws.damaged_manifest is not None and not force:
        previous = _recovered_dataset(ws, identity, table, fingerprint)
    height, width = recipe.data.height, recipe.data.width
    cache_path = ws.cache_path(height, width)

    if (previous and not force and previous.get("fingerprint") == fingerprint
            and ws.index_path.is_file() and previous.get("index_sha256") == sha256_file(ws.index_path)
            and _cache_intact(ws, cache_path, previous["num_images"], height, width,
                              recipe.data.resize)):
        log(f"[green]unchanged:[/] {escape(str(root))} matches the workspace index and "
            f"{escape(ws.rel(cache_path))}; nothing to do")
        if ws.damaged_manifest is not None:  # the ledger is all that was damaged: write it anew
            ws.manifest["dataset"] = previous
            run.add_output(ws.index_path)
        console.print(summary_table(_read_table(ws), escape(f"{dataset} in {ws.root}")))
        return

    if previous and not force and previous.get("fingerprint") != fingerprint:
        raise DmdlError(
            f"{root} changed since workspace {ws.root} was prepared from it (images added, "
            "removed or modified): pass --force to re-index it (its stage outputs are "
            "removed), or use a new workspace"
        )
    table, skipped = _without_bad_images(table, root, recipe.run.workers, skip_bad_images)
    if _in(table, staging):
        indexed = _relocated(table, staging / "synthetic", root)
        skipped = [(p.replace(str(staging / "synthetic"), str(root), 1), why) for p, why in skipped]
    else:
        indexed = table
    run.set(root=str(root))
    entry = {**identity, "fingerprint": fingerprint, "skipped_bad_images": skipped}
    cache_seconds = _write_outputs(ws, recipe, run, table, indexed, entry, staging)
    log(f"wrote {escape(str(ws.index_path))} and {escape(str(cache_path))} "
        f"({cache_path.stat().st_size / 2**20:.1f} MiB, {cache_seconds:.1f} s)")
    console.print(summary_table(table, escape(f"{dataset} in {ws.root}")))


def _recovered_dataset(ws: Workspace, identity: dict, table: IndexTable, fingerprint: str
                       ) -> dict[str, Any] | None:
    """The ``dataset`` entry of a workspace whose ledger is damaged, rebuilt from its index when
    that index is the one ``table`` makes (the same data set: its stage outputs stay valid);
    otherwise a workspace with stage outputs is refused (without ``--force``)."""
    if ws.index_path.is_file() and ws.index_path.read_bytes() == index_to_csv(table).encode():
        return {**identity, "fingerprint": fingerprint, "index_sha256": sha256_file(ws.index_path),
                "num_images": len(table), "skipped_bad_images": []}
    kept = [name for name in STAGE_DIRS if name != "data" and (ws.root / name).exists()]
    if kept:
        raise DmdlError(
            f"{ws.manifest_path} is damaged and {ws.index_path} is not the index of {identity['root']}: "
            f"the stage outputs ({', '.join(kept)}) cannot be told apart from another data set's; "
            "pass --force to prepare the workspace again (they are removed)")
    return None


def _check_identity(ws: Workspace, previous: dict | None, identity: dict, force: bool) -> None:
    """Refuse a workspace prepared from another data set, root or trial (unless ``force``)."""
    if previous and not force and any(previous.get(k) != v for k, v in identity.items()):
        raise DmdlError(
            f"workspace {ws.root} was prepared from {previous['name']} at {previous['root']}"
            f"{' trial ' + str(previous['trial']) if previous.get('trial') else ''}: "
            "use a new workspace, or --force to replace it (its stage outputs are removed)"
        )


def _read_dataset(ws: Workspace, recipe: Recipe, identity: dict, previous: dict | None,
                  force: bool, staging: Path | None) -> tuple[Path, IndexTable]:
    """The data root (the synthetic set generated first) and its index, whose paths are where
    the images are now (a synthetic set regenerated by ``--force``: in ``staging``)."""
    dataset, root, trial = identity["name"], Path(identity["root"]), identity["trial"] or 1
    start = time.perf_counter()
    if dataset_record(dataset).generated:
        _check_identity(ws, previous, identity, force)  # before generating anything into the workspace
        table = read_source(dataset, _synthetic_root(ws, root, recipe.synthetic, force, staging),
                            trial=trial)
    else:
        table = read_source(dataset, root, trial=trial)  # a bad root is named first
        _check_identity(ws, previous, identity, force)
    log(f"read {len(table)} images of {dataset} from {escape(str(root))} ({time.perf_counter() - start:.1f} s)")
    return root, table


def _without_bad_images(table: IndexTable, root: Path, workers: int, skip: bool
                        ) -> tuple[IndexTable, list[tuple[str, str]]]:
    """Scan every image; refuse unreadable ones, or leave them out when ``skip`` (returned)."""
    start = time.perf_counter()
    bad = find_bad_images(table.paths, workers=max(1, workers))
    log(f"checked {len(table)} images ({time.perf_counter() - start:.1f} s): {len(bad)} unreadable")
    if not bad:
        return table, []
    listed = "; ".join(f"{p} ({why})" for p, why in bad[:MAX_LISTED])
    more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    if not skip:
        raise DmdlError(
            f"{len(bad)} unreadable images in {root}: {listed}{more}; "
            "repair them or pass --skip-bad-images to exclude them"
        )
    bad_set = {p for p, _ in bad}
    keep = np.array([p not in bad_set for p in table.paths], dtype=bool)
    log(f"[yellow]excluding {len(bad)} unreadable images[/] (recorded in the manifest)")
    return table.select(keep), bad


def _in(table: IndexTable, staging: Path | None) -> bool:
    """Whether ``table``'s images were generated into ``staging`` (a regenerated synthetic set)."""
    return staging is not None and bool(table.paths) and table.paths[0].startswith(str(staging))


def _relocated(table: IndexTable, now: Path, then: Path) -> IndexTable:
    """``table`` with the paths under ``now`` moved under ``then``."""
    return IndexTable([str(then) + p[len(str(now)):] for p in table.paths], table.pids, table.cams,
                      table.modality, table.split)


def _write_outputs(ws: Workspace, recipe: Recipe, run: StageRun, table: IndexTable,
                   indexed: IndexTable, entry: dict[str, Any], staging: Path | None) -> float:
    """Cache (from ``table``'s files), index (``indexed``), recipe and the manifest's
    ``dataset`` entry, in place; or, replacing a prepared workspace (``staging``), built there
    and swapped in (``data/swap.py``). Returns the cache's seconds."""
    home = staging if staging is not None else ws.root
    index_path = home / ws.rel(ws.index_path)
    cache_path = home / ws.rel(ws.cache_path(recipe.data.height, recipe.data.width))
    start = time.perf_counter()
    build_cache(table.paths, cache_path, recipe.data.height, recipe.data.width,
                workers=max(1, recipe.run.workers), resize=recipe.data.resize)
    cache_seconds = time.perf_counter() - start
    write_index(indexed, index_path)
    atomic_write_text(home / RECIPE_FILE, recipe.to_yaml())
    cache_sha256 = (read_record(cache_path) or {}).get("sha256")
    dataset = {
        **{k: v for k, v in entry.items() if k != "skipped_bad_images"},
        "index_sha256": sha256_file(index_path),
        "num_images": len(table),
        "skipped_bad_images": [{"path": p, "reason": why} for p, why in entry["skipped_bad_images"]],
    }
    if staging is not None:
        outputs = [{"path": ws.rel(ws.root / p.relative_to(staging)), "sha256": sha,
                    "bytes": p.stat().st_size}
                   for p, sha in ((index_path, dataset["index_sha256"]), (cache_path, cache_sha256))]
        swap(ws, run.entry["id"], dataset, outputs)
    else:
        ws.manifest["dataset"] = dataset
    run.add_output(ws.index_path, dataset["index_sha256"])
    run.add_output(ws.cache_path(recipe.data.height, recipe.data.width), cache_sha256)
    run.set(cache_seconds=round(cache_seconds, 2), cache_bytes=ws.cache_path(
        recipe.data.height, recipe.data.width).stat().st_size)
    return cache_seconds


def _cache_intact(ws: Workspace, cache_path: Path, n: int, height: int, width: int,
                  resize: str) -> bool:
    """Full integrity check of the cache (its sha256 against its record), timed and printed;
    a cache resized with another filter than ``resize`` is not the one the recipe asks for.

    A workspace written before caches had records (or before records held a checksum of each
    row) is checked against the sha256 the manifest (or the old record) holds for the cache, and
    a complete record is written when they agree.
    """
    if not cache_path.is_file():
        log(f"[yellow]{escape(ws.rel(cache_path))} is missing: building it[/]")
        return False
    record = read_record(cache_path)
    if record_checksums(record, n) is None:  # no record, or one without per-row checksums
        recorded = (record or {}).get("sha256") or _recorded_sha256(ws, cache_path)
        # the filter of its time: the old record's, else bilinear (the only one before records)
        fresh = (cache_record(cache_path, n, height, width, resize=cache_resize(record))
                 if recorded else None)
        if fresh is not None and fresh["sha256"] == recorded and fresh["bytes"] == n * height * width * 3:
            record = fresh
            write_record(cache_path, record)
            log(f"added the checksum of each row to {escape(ws.rel(cache_path))}'s integrity record")
    if cache_resize(record) != resize:
        log(f"[yellow]{escape(ws.rel(cache_path))} was resized {cache_resize(record)} and the "
            f"recipe asks data.resize {resize}: rebuilding it[/]")
        return False
    intact, seconds = verify_cache(cache_path, n, height, width)
    size = cache_path.stat().st_size / 2**20
    if intact:
        log(f"checked the sha256 of {escape(ws.rel(cache_path))} ({size:.1f} MiB, {seconds:.2f} s)")
    else:
        log(f"[yellow]{escape(ws.rel(cache_path))} does not match its recorded sha256 "
            f"(damaged or half-written): rebuilding it[/]")
    return intact


def _recorded_sha256(ws: Workspace, path: Path) -> str | None:
    """The sha256 the newest finished prepare-data run recorded for ``path``."""
    rel = ws.rel(path)
    for run in reversed(ws.runs("prepare-data")):
        if run.get("status") == "done":
            for out in run.get("outputs", []):
                if out.get("path") == rel:
                    return out.get("sha256")
    return None


def _read_table(ws: Workspace) -> IndexTable:
    from dmdl_cli.data.index import read_index

    return read_index(ws.index_path)
