"""Tables of a report: per-epoch rows of one workspace, its evaluations, and the comparison of
several workspaces (mean ± std over the runs of each recipe variant). Each table is shown on the
console (rich) and written as markdown and CSV."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from rich import box
from rich.table import Table

from dmdl_cli.recipe import UNHASHED_SECTIONS
from dmdl_cli.report.logs import Evaluation, WorkspaceRecord

RANKS = (1, 5, 10, 20)
# Keys that tell runs of one recipe apart without making them another variant (as do the keys
# of the sections that change no result: run.workers, ...).
RUN_KEYS = ("train.seed", "data.trial")


def _variant_key(name: str) -> bool:
    return name not in RUN_KEYS and name.split(".")[0] not in UNHASHED_SECTIONS


def _num(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}"


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}"


# (key, console header, format); loss parts are appended per log (their names differ by stage)
EPOCH_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("stage", "stage", str), ("epoch", "epoch", str), ("loss", "loss", _num(3)),
    ("vis_clusters", "vis clusters", str), ("vis_outliers", "vis outliers", str),
    ("ir_clusters", "IR clusters", str), ("ir_outliers", "IR outliers", str),
    ("unified_ids", "unified ids", str), ("association_accuracy", "assoc acc", _num(3)),
    ("vis_ari", "vis ARI", _num(3)), ("vis_nmi", "vis NMI", _num(3)),
    ("ir_ari", "IR ARI", _num(3)), ("ir_nmi", "IR NMI", _num(3)),
    ("mean_confidence", "confidence", _num(3)),
    ("monitor_rank1", "test R1 %", _pct), ("monitor_mAP", "test mAP %", _pct),
    ("lr", "lr", lambda v: f"{v:.2e}"), ("images_per_s", "img/s", _num(1)),
    ("seconds", "epoch s", _num(1)),
]


@dataclass
class TableData:
    """A table as plain cells: what the console, markdown and CSV writers share."""

    title: str
    header: list[str]
    rows: list[list[str]]
    raw: list[dict[str, Any]]  # unformatted values for CSV
    console_columns: list[int] | None = None  # the columns the console shows (None: all)
    text_columns: int = 2  # leading left-aligned columns
    notes: list[str] = field(default_factory=list)  # lines under the table (a legend)

    def rich(self) -> Table:
        shown = self.console_columns or list(range(len(self.header)))
        table = Table(title=self.title, box=box.SIMPLE_HEAD, pad_edge=False,
                      caption="\n".join(self.notes) or None, caption_justify="left")
        for i in shown:
            table.add_column(self.header[i], justify="left" if i < self.text_columns else "right")
        for row in self.rows:
            table.add_row(*[row[i] for i in shown])
        return table

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        keys: list[str] = []
        for rec in self.raw:
            keys += [k for k in rec if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.raw)
        return buf.getvalue()


def _pair(a: str, b: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    return lambda row: "/".join(fmt(row[k]) if k in row else "-" for k in (a, b))


# The console's narrower view: counts and diagnostics of a modality share a cell (a/b).
COMPACT_COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("stage", "stage", lambda r: str(r["stage"])), ("epoch", "epoch", lambda r: str(r["epoch"])),
    ("loss", "loss", lambda r: f"{r['loss']:.3f}"),
    ("vis_clusters", "vis clu/out", _pair("vis_clusters", "vis_outliers", str)),
    ("ir_clusters", "IR clu/out", _pair("ir_clusters", "ir_outliers", str)),
    ("unified_ids", "ids", lambda r: str(r["unified_ids"])),
    ("association_accuracy", "assoc", lambda r: f"{r['association_accuracy']:.2f}"),
    ("vis_ari", "vis ARI/NMI", _pair("vis_ari", "vis_nmi", _num(2))),
    ("ir_ari", "IR ARI/NMI", _pair("ir_ari", "ir_nmi", _num(2))),
    ("lr", "lr", lambda r: f"{r['lr']:.1e}"),
    ("images_per_s", "img/s", lambda r: f"{r['images_per_s']:.0f}"),
    ("seconds", "s", lambda r: f"{r['seconds']:.1f}"),
    ("monitor_mAP", "test mAP", lambda r: _pct(r["monitor_mAP"])),
]


def epoch_table(record: WorkspaceRecord, compact: bool = False) -> TableData:
    """Per-epoch rows of every stage; columns nothing was logged for are left out. ``compact``:
    the console's view (no loss parts, paired cells)."""
    raw = [row for stage in record.stages for row in stage.epochs]
    title = f"{record.label}: per epoch"
    if compact:
        shown = [c for c in COMPACT_COLUMNS if any(c[0] in row for row in raw)]
        rows = [[cell(row) if key in row else "" for key, _, cell in shown] for row in raw]
        return TableData(title + " (clusters/outliers; diagnostics vs true ids)",
                         [h for _, h, _ in shown], rows, raw)
    parts = sorted({k for row in raw for k in row if k.startswith("loss_")})
    columns = EPOCH_COLUMNS[:3] + [(p, p[5:], _num(3)) for p in parts] + EPOCH_COLUMNS[3:]
    columns = [c for c in columns if any(c[0] in row for row in raw)]
    rows = [[fmt(row[key]) if key in row else "" for key, _, fmt in columns] for row in raw]
    return TableData(title, [h for _, h, _ in columns], rows, raw)


# The label-free criteria of each model (docs/selection.md): (record key, header, the
# console's short header or None when the console leaves it out, format).
CRITERIA_COLUMNS: list[tuple[str, str, str | None, Callable[[Any], str]]] = [
    ("eps_robustness", "eps robustness", "robust", _num(3)),
    ("independence", "independence", None, _num(3)),
    ("compactness", "compactness", None, _num(3)),
    ("label_ari", "ARI vs previous", "ARI prev", _num(3)),
    ("label_nmi", "NMI vs previous", None, _num(3)),
    ("unified_ari", "unified ARI vs previous", None, _num(3)),
    ("pairs_kept", "pairs kept", "pairs kept", _num(3)),
    ("mutual_nn", "mutual NN", "mutual NN", _num(3)),
    ("matching_cost", "matching cost", "match cost", _num(3)),
    ("association_cost", "association cost", None, _num(3)),
    ("effective_rank", "effective rank", "rank", _num(1)),
    ("largest_share", "largest %", "largest %", _pct),
    ("outlier_share", "outliers %", "outl %", _pct),
    ("clusters", "clusters", "clusters", str),
]


def model_label(stage: str, epoch: int, models: dict[int, str]) -> str:
    """What a criteria record's model is: its kept file, the start model, or not kept."""
    if epoch in models:
        return models[epoch]
    if epoch == 0:
        return "untrained" if stage == "stage1" else "start"
    return "(not kept)"


def criteria_table(title: str, stages: list[Any], *, compact: bool = False,
                   criterion: str | None = None) -> TableData:
    """One row per model of each stage (``stages``: objects with ``stage``, ``criteria``,
    ``models`` and ``selected``, as :class:`dmdl_cli.report.logs.StageLog`): its epochs trained,
    file and criteria, ``<`` on the model ``selected.pt`` names. ``criterion``: the rule's,
    marked ``*`` in its header (and shown in the ``compact`` console view too). Columns no
    record defines are left out."""
    raw: list[dict[str, Any]] = []
    for st in stages:
        for rec in st.criteria:
            e = int(rec["epoch"])
            raw.append({"stage": st.stage, "epochs trained": e,
                        "model": model_label(st.stage, e, st.models),
                        **{c[0]: rec[c[0]] for c in CRITERIA_COLUMNS if rec.get(c[0]) is not None},
                        "selected": "<" if st.selected == e else ""})
    columns = [(key, short if compact else long, fmt) for key, long, short, fmt in CRITERIA_COLUMNS
               if (not compact or short is not None or key == criterion)
               and any(key in row for row in raw)]
    columns = [(key, head or key, fmt) for key, head, fmt in columns]
    header = ["stage", "epochs" if compact else "epochs trained", "model",
              *[h + (" *" if k == criterion else "") for k, h, _ in columns],
              "<" if compact else "selected"]
    rows = [[str(row["stage"]), str(row["epochs trained"]), row["model"],
             *[fmt(row[k]) if k in row else "-" for k, _, fmt in columns], row["selected"]]
            for row in raw]
    notes = ["epochs trained: the model that made the labelling (0: the model the stage started "
             "from); - : not defined for that model (stability needs the previous one)"]
    if criterion:
        notes.append(f"* the rule's criterion ({criterion}); < the selected model")
    return TableData(title, header, rows, raw, text_columns=3, notes=notes)


def _pm(values: list[float]) -> str:
    arr = 100 * np.asarray(values, dtype=np.float64)
    return f"{arr.mean():.2f}" + (f" ± {arr.std():.2f}" if len(arr) > 1 else "")


def evaluation_table(record: WorkspaceRecord) -> TableData:
    """Every evaluation of one workspace: mean ± std over its gallery trials."""
    header = ["protocol", "checkpoint", *[f"Rank-{r}" for r in RANKS], "mAP", "mINP", "trials"]
    rows, raw = [], []
    for ev in record.evaluations:
        m = ev.mean
        n = int(m.get("trials", 1))
        cells = [_cell(m["cmc"], m.get("cmc_std"), r - 1, n) for r in RANKS]
        rows.append([_protocol(ev), ev.checkpoint, *cells, _cell([m["mAP"]], [m.get("mAP_std", 0)], 0, n),
                     _cell([m["mINP"]], [m.get("mINP_std", 0)], 0, n), str(n)])
        raw.append({"protocol": _protocol(ev), "checkpoint": ev.checkpoint,
                    **{f"rank{r}": _at(m["cmc"], r - 1) for r in RANKS},
                    "mAP": m["mAP"], "mINP": m["mINP"], "trials": n})
    return TableData(f"{record.label}: evaluations (mean ± std over gallery trials)", header, rows, raw)


def _at(values: list[float], i: int) -> float:
    return float(values[min(i, len(values) - 1)])


def _cell(mean: list[float], std: list[float] | None, i: int, n: int) -> str:
    text = f"{100 * _at(mean, i):.2f}"
    return text + (f" ± {100 * _at(std, i):.2f}" if n > 1 and std else "")


def _protocol(ev: Evaluation) -> str:
    return ev.mode + (f" ({ev.variant})" if ev.variant else "")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# The longest variant name written out as its keys (``cai.enabled=False``); longer ones are
# named A, B, ... with a legend under the table.
VARIANT_NAME_WIDTH = 40


def _variants(records: list[WorkspaceRecord]) -> list[tuple[str, list[WorkspaceRecord], str]]:
    """(name, workspaces, the recipe keys that set the variant apart) per variant, in order.
    Workspaces whose recipes differ only in seed, RegDB trial or `run:` keys form one variant."""
    groups: dict[str, list[WorkspaceRecord]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for rec in records:
        flat = {k: v for k, v in flatten(rec.recipe).items() if _variant_key(k)}
        key = repr(sorted((k, repr(v)) for k, v in flat.items()))
        groups.setdefault(key, []).append(rec)
        settings[key] = flat
    if len(groups) == 1:
        return [("all runs", next(iter(groups.values())), "")]
    every = set().union(*(s.keys() for s in settings.values()))
    varying = sorted(k for k in every if len({repr(s.get(k)) for s in settings.values()}) > 1)
    keys = {key: ", ".join(f"{k}={settings[key].get(k)}" for k in varying) for key in groups}
    short = all(len(text) <= VARIANT_NAME_WIDTH for text in keys.values())
    return [(keys[key] if short else chr(ord("A") + i) if i < 26 else f"V{i + 1}", members, keys[key])
            for i, (key, members) in enumerate(groups.items())]


def group_variants(records: list[WorkspaceRecord]) -> list[tuple[str, list[WorkspaceRecord]]]:
    """(variant name, its workspaces): named by the recipe keys on which the variants differ
    when that is short, else A, B, ... (``all runs`` when there is one variant)."""
    return [(name, members) for name, members, _ in _variants(records)]


def comparison_table(records: list[WorkspaceRecord]) -> TableData:
    """Per variant and evaluation: mean ± std over the variant's workspaces, and mAP per run. A
    variant without any evaluation gets one row saying so; the variant is named on its first
    row only, and a legend under the table says what A, B, ... are."""
    header = ["variant", "protocol", "checkpoint", *[f"Rank-{r}" for r in RANKS], "mAP", "mINP",
              "runs", "mAP per run"]
    rows, raw, notes = [], [], []
    for variant, members, differs in _variants(records):
        if variant != differs and differs:
            notes.append(f"{variant}: {differs} ({', '.join(r.label for r in members)})")
        keys: list[tuple[str, str]] = []
        found: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rec in members:
            for ev in rec.evaluations:
                key = (_protocol(ev), ev.checkpoint)
                if key not in found:
                    keys.append(key)
                found.setdefault(key, []).append(ev.mean)
        first = len(rows)
        if not keys:  # trained or not, nothing evaluated yet: shown, not hidden
            rows.append([variant, "no evaluation", "(run `dmdl evaluate`)", *[""] * len(RANKS),
                         "", "", f"0/{len(members)}", ""])
            raw.append({"variant": variant, "protocol": "", "checkpoint": "", "runs": 0,
                        "workspaces": " ".join(str(r.root) for r in members), "differs": differs})
        for key in keys:
            means = found[key]
            cmc = [[_at(m["cmc"], r - 1) for r in RANKS] for m in means]
            maps, minps = [m["mAP"] for m in means], [m["mINP"] for m in means]
            rows.append([variant if len(rows) == first else "", *key,
                         *[_pm([c[i] for c in cmc]) for i in range(len(RANKS))],
                         _pm(maps), _pm(minps), f"{len(means)}/{len(members)}",
                         ", ".join(f"{100 * v:.1f}" for v in maps)])
            raw.append({"variant": variant, "protocol": key[0], "checkpoint": key[1],
                        **{f"rank{r}_mean": float(np.mean([c[i] for c in cmc])) for i, r in enumerate(RANKS)},
                        "mAP_mean": float(np.mean(maps)), "mAP_std": float(np.std(maps)),
                        "mINP_mean": float(np.mean(minps)), "mINP_std": float(np.std(minps)),
                        "runs": len(means), "workspaces": " ".join(str(r.root) for r in members),
                        "differs": differs})
    title = f"comparison of {len(records)} workspaces (mean ± std over the runs of each variant)"
    narrow = [header.index(h) for h in ("variant", "protocol", "checkpoint", "Rank-1", "mAP", "mINP",
                                        "runs", "mAP per run")]
    return TableData(title, header, rows, raw, console_columns=narrow, text_columns=3, notes=notes)
