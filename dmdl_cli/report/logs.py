"""Reading what training and evaluation wrote: ``WS/stage*/log.jsonl`` and ``WS/eval/*.json``.

A stage's log holds mixed records (see :mod:`dmdl_cli.training.logs`): ``labels`` (pseudo-label
statistics at the start of an epoch), ``criteria`` (the label-free criteria of each model's
labelling, docs/selection.md), ``step`` (losses every 10 steps), ``speed``, ``epoch``
(seconds, learning rate), ``monitor`` (test-set monitoring). :func:`epoch_rows` folds the
per-epoch ones into one flat row per epoch (missing values are simply absent from a row); the
criteria records are kept per model (``StageLog.criteria``), with the model the stage's
``selected.pt`` names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dmdl_cli.data.index import INFRARED, VISIBLE, read_index
from dmdl_cli.errors import DmdlError
from dmdl_cli.selected import SELECTED, read_selection, stage_models
from dmdl_cli.selection.rule import criteria_records
from dmdl_cli.stages import STAGE_RECIPE, TRAINING_STAGES, stage_spec

MODALITY_PREFIX = {"visible": "vis", "infrared": "ir"}
# how evaluations are ordered in tables: untrained first, then each stage's final model
CHECKPOINT_ORDER = ("imagenet", "random-init", *(f"{spec.folder}-final" for spec in TRAINING_STAGES))


@dataclass
class StageLog:
    """One stage's log: flat per-epoch rows and the logged step losses."""

    stage: str
    epochs: list[dict[str, Any]]  # one row per epoch, "epoch" 1-based
    steps: list[dict[str, Any]]  # step records with "x": epochs done (fractional)
    finished: bool
    # criteria records, one per model ("epoch": epochs it had trained; 0 = the start model)
    criteria: list[dict[str, Any]] = field(default_factory=list)
    models: dict[int, str] = field(default_factory=dict)  # epochs trained -> its kept file
    selected: int | None = None  # epochs trained of the model selected.pt names (None: none)


@dataclass
class Evaluation:
    """One ``WS/eval/<name>.json``: a protocol's mean (and std) over gallery trials."""

    name: str  # file stem, e.g. all-search-stage2-final
    mode: str
    checkpoint: str
    variant: str  # "" or "re-ranked" / "10-shot"
    mean: dict[str, Any]  # cmc (R,), cmc_std, mAP, mAP_std, mINP, mINP_std, trials


@dataclass
class WorkspaceRecord:
    """Everything the report reads from one workspace."""

    root: Path
    label: str
    stages: list[StageLog]
    evaluations: list[Evaluation]
    recipe: dict[str, Any] = field(default_factory=dict)
    # true identities of the train split per modality ("vis", "ir"), from data/index.csv; empty
    # when the data set has none (diagnostics only: the figures draw them as reference lines)
    true_ids: dict[str, int] = field(default_factory=dict)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut by a kill is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def epoch_rows(records: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """One flat row per epoch: losses (mean over the logged steps), clusters, outliers and
    diagnostics per modality, association accuracy, learning rate, images/s, seconds."""
    rows: dict[int, dict[str, Any]] = {}
    losses: dict[int, dict[str, list[float]]] = {}
    for rec in records:
        kind, epoch = rec.get("kind"), rec.get("epoch")
        if kind in (None, "start", "end", "criteria") or not isinstance(epoch, int):
            continue
        row = rows.setdefault(epoch, {"stage": stage, "epoch": epoch + 1})
        if kind == "step":
            for key, value in rec.items():
                if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)):
                    losses.setdefault(epoch, {}).setdefault(key, []).append(float(value))
        elif kind == "labels":
            row.update(_label_fields(rec))
        elif kind == "speed":
            row["images_per_s"] = rec.get("images_per_s")
        elif kind == "epoch":
            row["lr"], row["seconds"] = rec.get("lr"), rec.get("seconds")
        elif kind == "monitor":
            row["monitor_rank1"], row["monitor_mAP"] = rec.get("rank1"), rec.get("mAP")
    for epoch, parts in losses.items():
        for key, values in parts.items():
            rows[epoch][key if key == "loss" else f"loss_{key}"] = sum(values) / len(values)
    return [{k: v for k, v in rows[e].items() if v is not None} for e in sorted(rows)]


def _label_fields(rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for modality, prefix in MODALITY_PREFIX.items():
        stats = rec.get(modality) or {}
        for key in ("clusters", "outliers", "ari", "nmi"):
            if key in stats:
                out[f"{prefix}_{key}"] = stats[key]
    for key in ("unified_ids", "association_accuracy", "association_chance", "mean_confidence"):
        if key in rec:
            out[key] = rec[key]
    return out


def step_points(records: list[dict[str, Any]], iters: int | None) -> list[dict[str, Any]]:
    """Step records with ``x`` = epochs done (epoch + step / iterations per epoch)."""
    per_epoch = iters or max((r.get("step", 0) for r in records if r.get("kind") == "step"), default=1)
    out = []
    for rec in records:
        if rec.get("kind") == "step" and isinstance(rec.get("epoch"), int):
            out.append({**rec, "x": rec["epoch"] + rec.get("step", 0) / max(per_epoch, 1)})
    return out


def read_stage(ws: Path, stage: str, recipe: dict[str, Any]) -> StageLog | None:
    path = ws / stage / "log.jsonl"
    if not path.is_file():
        return None
    records = read_jsonl(path)
    iters = (recipe.get(stage) or {}).get("iters")
    epochs = (recipe.get(stage) or {}).get("epochs")
    models = stage_models(ws, stage_spec(stage), epochs) if isinstance(epochs, int) else {}
    return StageLog(stage, epoch_rows(records, stage), step_points(records, iters),
                    finished=any(r.get("kind") == "end" for r in records),
                    criteria=[dict(r) for r in criteria_records(records)],
                    models={e: p.name for e, p in models.items()},
                    selected=_selected_epoch(ws, stage))


def _selected_epoch(ws: Path, stage: str) -> int | None:
    """The epoch of the model the stage's ``selected.pt`` names (None without a readable one)."""
    pointer = ws / stage_spec(stage).folder / SELECTED
    if not pointer.is_file():
        return None
    try:
        selection = read_selection(pointer)
    except DmdlError:
        return None
    return selection.epoch if selection.stage == stage else None


def read_evaluation(path: Path) -> Evaluation:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        protocol, mean = data["protocol"], data["mean"]
        variant = " ".join(filter(None, ["re-ranked" if protocol.get("rerank") else "",
                                         f"{protocol['shots']}-shot" if protocol.get("shots", 1) != 1 else ""]))
        return Evaluation(path.stem, protocol["mode"], data["checkpoint"]["name"], variant, mean)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DmdlError(f"{path} is not an evaluation written by `dmdl evaluate` ({err}): "
                        "delete it or evaluate again") from None


def _checkpoint_rank(name: str) -> tuple[int, str]:
    return (CHECKPOINT_ORDER.index(name) if name in CHECKPOINT_ORDER else len(CHECKPOINT_ORDER), name)


def _recipe_of(ws: Path) -> dict[str, Any]:
    """The recipe the newest stage ran with (its own ``recipe.yaml`` when the stage wrote one),
    else the workspace's; {} when there is none."""
    newest_first = [ws / spec.folder / STAGE_RECIPE for spec in reversed(TRAINING_STAGES)]
    for path in (*newest_first, ws / "recipe.yaml"):
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise DmdlError(f"{path} is not valid YAML ({err}): restore it or delete it") from None
            return data if isinstance(data, dict) else {}
    return {}


def read_workspace(ws: Path, label: str | None = None) -> WorkspaceRecord:
    """The logs and evaluations of one workspace; refuses a folder that holds neither."""
    ws = Path(ws)
    if not ws.is_dir():
        raise DmdlError(f"workspace {ws} does not exist: give a folder made by `dmdl prepare-data`")
    recipe = _recipe_of(ws)
    stages = [s for s in (read_stage(ws, name, recipe or {}) for name in (spec.name for spec in TRAINING_STAGES)) if s is not None]
    evals = [read_evaluation(p) for p in sorted((ws / "eval").glob("*.json"))]
    evals.sort(key=lambda e: (e.mode, e.variant, _checkpoint_rank(e.checkpoint)))
    if not stages and not evals:
        raise DmdlError(f"{ws} holds no training log (stage1/log.jsonl) and no evaluation "
                        f"(eval/*.json): run `dmdl pretrain-single --workspace {ws}` or "
                        f"`dmdl evaluate --workspace {ws}` first")
    return WorkspaceRecord(ws, label or ws.name, stages, evals, recipe or {}, _true_ids(ws))


def _true_ids(ws: Path) -> dict[str, int]:
    """Identities of the train split per modality (``{"vis": 60, "ir": 60}``); {} when the
    index is missing or unreadable, or holds no identities (pid -1)."""
    try:
        index = read_index(ws / "data" / "index.csv")
    except DmdlError:
        return {}
    train = (index.split == "train") & (index.pids >= 0)
    counts = {prefix: int(np.unique(index.pids[train & (index.modality == modality)]).size)
              for prefix, modality in (("vis", VISIBLE), ("ir", INFRARED))}
    return {prefix: n for prefix, n in counts.items() if n}
