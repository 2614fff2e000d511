"""PNG figures of a report, drawn with matplotlib's Agg canvas (no display, no global backend).

One workspace: ``training_curves.png`` (losses per stage with the triplet weight that makes the
total rise, learning rate, speed, and test-set monitoring when it was logged),
``pseudo_labels.png`` (clusters and outliers per modality against the true number of
identities, ARI/NMI, stage 2's association accuracy against chance, label confidence),
``selection.png`` (the label-free criteria of each model, the selected one marked) and
``cmc.png`` (every evaluation). Several: ``compare_curves.png`` and ``compare_cmc.png`` with one
line per workspace. Per-epoch curves are drawn per stage: stage 2's epochs continue after stage
1's, and no line joins the two stages. A panel is drawn only when something was logged for it.
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Callable

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dmdl_cli.atomic import atomic_write_bytes
from dmdl_cli.recipe import triplet_weight
from dmdl_cli.report.logs import CHECKPOINT_ORDER, StageLog, WorkspaceRecord
from dmdl_cli.stages import STAGES

MODALITY_STYLE = {"vis": ("visible", "tab:orange"), "ir": ("infrared", "tab:purple")}
NOTE_WIDTH = 84  # characters of a panel's explaining lines under its title
Panel = Callable[[Axes], None]


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _grid(title: str, panels: list[Panel], path: Path) -> Path | None:
    """Draw ``panels`` on a two-column grid and write it; nothing when there is no panel."""
    if not panels:
        return None
    rows = math.ceil(len(panels) / 2)
    cols = 1 if len(panels) == 1 else 2
    fig = Figure(figsize=(6.4 * cols, 4.0 * rows), layout="constrained")
    fig.suptitle(title, fontsize=13)
    for i, draw in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and ranks are whole
        draw(ax)
    return _save(fig, path)


def _title(ax: Axes, title: str, note: str = "") -> None:
    """A panel title, with lines under it that say how to read the panel (wrapped to fit)."""
    lines = textwrap.wrap(note, NOTE_WIDTH) if note else []
    ax.set_title("\n".join([title, *lines]), fontsize=10 if lines else 12)


def _stage_title(stage: str) -> str:
    return STAGES[stage].title if stage in STAGES else stage


def _offsets(record: WorkspaceRecord) -> dict[str, int]:
    """x offset of each stage: stage 2's epochs continue after stage 1's."""
    out, offset = {}, 0
    for stage in record.stages:
        out[stage.stage] = offset
        offset += len(stage.epochs)
    return out


def _segments(record: WorkspaceRecord, key: str, stages: tuple[str, ...] | None = None
              ) -> list[tuple[list[float], list[float]]]:
    """(xs, ys) of ``key`` per stage (x = epoch, stage 2 after stage 1), one segment a stage."""
    offsets = _offsets(record)
    out = []
    for stage in record.stages:
        if stages is not None and stage.stage not in stages:
            continue
        pts = [(offsets[stage.stage] + row["epoch"], row[key]) for row in stage.epochs if key in row]
        if pts:
            out.append(([p[0] for p in pts], [p[1] for p in pts]))
    return out


def _plot_segments(ax: Axes, segments: list[tuple[list[float], list[float]]], **style: Any) -> None:
    """One line per stage in one colour and one legend entry: nothing joins the stages."""
    for xs, ys in segments:
        line = ax.plot(xs, ys, marker="o", ms=3, **style)[0]
        style = {**style, "color": line.get_color(), "label": "_nolegend_"}


def _boundary(record: WorkspaceRecord) -> float | None:
    """x of the line between stage 1 and stage 2, or None with fewer than two stages."""
    if len(record.stages) > 1 and record.stages[0].epochs:
        return len(record.stages[0].epochs) + 0.5
    return None


def _stage_bounds(ax: Axes, record: WorkspaceRecord) -> None:
    x = _boundary(record)
    if x is not None:
        ax.axvline(x, color="grey", ls=":", lw=1)
        ax.text(x + 0.1, 0.98, "stage 2 ->", transform=ax.get_xaxis_transform(), va="top",
                fontsize=8, color="grey")


def _ramp(record: WorkspaceRecord, stage: StageLog) -> list:
    """The stage's triplet ramp ``[[epoch, weight], ...]`` from the recipe it ran with."""
    return list((record.recipe.get(stage.stage) or {}).get("triplet_ramp") or [])


def _loss_panel(record: WorkspaceRecord, stage: StageLog) -> Panel:
    ramp = _ramp(record, stage)

    def draw(ax: Axes) -> None:
        keys = [k for k in stage.steps[0] if k not in ("kind", "epoch", "step", "x")]
        for key in keys:
            xs = [s["x"] for s in stage.steps if key in s]
            ax.plot(xs, [s[key] for s in stage.steps if key in s], marker=".",
                    lw=2.2 if key == "loss" else 1.2, label="total" if key == "loss" else key)
        note, handles = "", ax.get_legend_handles_labels()
        if ramp:
            # the triplet term joins the total with this weight (0 before the ramp's first
            # entry): the total steps up where the weight does, which is not divergence
            epochs = max(len(stage.epochs), 1)
            weights = [triplet_weight(ramp, e) for e in range(epochs)]
            right = ax.twinx()
            right.step(list(range(epochs + 1)), weights + weights[-1:], where="post",
                       color="black", ls="--", lw=1, label="triplet weight (right axis)")
            right.set_ylabel(f"triplet weight ({stage.stage}.triplet_ramp)", fontsize=8)
            right.set_ylim(0, max(weights + [1.0]) * 1.6)
            more = right.get_legend_handles_labels()
            handles = (handles[0] + more[0], handles[1] + more[1])
            note = "the total rises where the triplet weight (dashed) steps up"
        _title(ax, f"losses, {_stage_title(stage.stage)}", note)
        ax.set(xlabel="epochs done", ylabel="loss (logged steps; parts unweighted)")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top + 0.45 * (top - bottom))  # room for the legend above the curves
        ax.legend(*handles, fontsize=7, loc="upper left", ncol=3)
        ax.grid(alpha=0.3)
    return draw


def _metric_panel(record: WorkspaceRecord, title: str, ylabel: str,
                  lines: list[tuple[str, str, str | None]], *, log_y: bool = False,
                  stages: tuple[str, ...] | None = None, note: str = "",
                  extra: Callable[[Axes], None] | None = None) -> Panel | None:
    """A per-epoch panel of ``lines`` (key, legend label, colour), drawn per stage (``stages``:
    only those); ``extra`` draws reference lines. None when none of the keys is logged."""
    if not any(_segments(record, key, stages) for key, _, _ in lines):
        return None

    def draw(ax: Axes) -> None:
        for key, label, colour in lines:
            segments = _segments(record, key, stages)
            if segments:
                _plot_segments(ax, segments, label=label, color=colour,
                               ls="--" if key.endswith("nmi") else "-")
        if extra is not None:
            extra(ax)
        if log_y:
            ax.set_yscale("log")
        _title(ax, title, note)
        ax.set(xlabel="epoch (stage 1, then stage 2)", ylabel=ylabel)
        if stages is None:
            _stage_bounds(ax, record)
        else:  # the chosen stages' epochs only, numbered as on the other panels
            xs = sorted({x for key, _, _ in lines for seg in _segments(record, key, stages)
                         for x in seg[0]})
            ax.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
            ax.set_xticks(xs)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return draw


def training_curves(record: WorkspaceRecord, out: Path) -> Path | None:
    return _grid(f"{record.label}: training", training_panels(record), out / "training_curves.png")


def training_panels(record: WorkspaceRecord) -> list[Panel]:
    """Losses per stage, learning rate, throughput, epoch time, monitoring: those logged."""
    panels: list[Panel | None] = [_loss_panel(record, s) for s in record.stages if s.steps]
    panels += [
        _metric_panel(record, "learning rate", "lr", [("lr", "lr", "tab:blue")], log_y=True,
                      note="each stage has its own schedule (step decay)"),
        _metric_panel(record, "throughput", "training images / s", [("images_per_s", "images/s", "tab:green")]),
        _metric_panel(record, "epoch time", "seconds (labelling + training)", [("seconds", "seconds", "tab:red")]),
        _metric_panel(record, "test-set monitoring (never selects a checkpoint)", "fraction",
                      [("monitor_rank1", "Rank-1", "tab:blue"), ("monitor_mAP", "mAP", "tab:red")]),
    ]
    return [p for p in panels if p]


def _k1_note(record: WorkspaceRecord) -> str:
    """Why stage 2's cluster counts saw-tooth, when the recipe alternates k1."""
    # stage2.k1_adopting; recipes of older workspaces held it as cluster.k1_adopting
    k1_adopting = ((record.recipe.get("stage2") or {}).get("k1_adopting")
                   or (record.recipe.get("cluster") or {}).get("k1_adopting"))
    if k1_adopting is None or not any(s.stage == "stage2" for s in record.stages):
        return ""
    k1 = (record.recipe.get("cluster") or {}).get("k1")
    return (f"stage 2 saw-tooth: the modality that adopts the other's ids (visible and infrared "
            f"in turn) is clustered with k1_adopting={k1_adopting} instead of k1={k1}: more, "
            f"smaller clusters, more outliers")


def _true_ids_lines(record: WorkspaceRecord) -> Callable[[Axes], None] | None:
    if not record.true_ids:
        return None

    def draw(ax: Axes) -> None:
        counts = record.true_ids
        if len(counts) > 1 and len(set(counts.values())) == 1:  # one line for both modalities
            ax.axhline(next(iter(counts.values())), color="black", ls=":", lw=1.2,
                       label=f"true identities, each modality: {next(iter(counts.values()))} "
                             f"(diagnostic)")
            return
        for prefix, count in counts.items():
            name, colour = MODALITY_STYLE[prefix]
            ax.axhline(count, color=colour, ls=":", lw=1.2,
                       label=f"true {name} identities: {count} (diagnostic)")
    return draw


def _chance_line(record: WorkspaceRecord) -> Callable[[Axes], None]:
    def draw(ax: Axes) -> None:
        segments = _segments(record, "association_chance", ("stage2",))
        if segments:
            _plot_segments(ax, segments, label="a random linking (chance)", color="grey", ls="--")
        ax.set_ylim(0, 1)
    return draw


def pseudo_label_curves(record: WorkspaceRecord, out: Path) -> Path | None:
    return _grid(f"{record.label}: pseudo labels", pseudo_label_panels(record),
                 out / "pseudo_labels.png")


def pseudo_label_panels(record: WorkspaceRecord) -> list[Panel]:
    """Clusters, outliers, ARI/NMI, stage 2's association, label confidence: those logged."""
    def per_modality(stat: str, label: str) -> list[tuple[str, str, str | None]]:
        return [(f"{p}_{stat}", f"{name} {label}".strip(), colour)
                for p, (name, colour) in MODALITY_STYLE.items()]

    k1_note = _k1_note(record)
    panels = [
        _metric_panel(record, "clusters per modality", "clusters", per_modality("clusters", ""),
                      note=k1_note, extra=_true_ids_lines(record)),
        _metric_panel(record, "outliers per modality (left out of the epoch)", "images",
                      per_modality("outliers", ""),
                      note="stage 2 saw-tooth: k1 alternates (clusters panel)" if k1_note else ""),
        _metric_panel(record, "pseudo labels vs true identities (diagnostic only)", "score",
                      per_modality("ari", "ARI") + per_modality("nmi", "NMI")),
        _metric_panel(record, "cross-modality association, stage 2 (diagnostic)", "fraction",
                      [("association_accuracy", "association accuracy", "tab:blue")],
                      stages=("stage2",), extra=_chance_line(record),
                      note="linked cluster pairs whose majority identities agree"),
        _metric_panel(record, "mean label confidence (CBT refinement)", "confidence",
                      [("mean_confidence", "mean confidence of labelled images", "tab:gray")],
                      note="GMM confidence of the pseudo labels; stage 1 reports 1 until "
                           "stage1.refine_from"),
    ]
    return [p for p in panels if p]


def _criteria_segments(record: WorkspaceRecord, key: str) -> list[tuple[list[float], list[float]]]:
    """(xs, ys) of criterion ``key`` per stage; x = the model's epochs trained, stage 2's after
    stage 1's last model (stage 2's start model sits on stage 1's final one)."""
    out, offset = [], 0
    for stage in record.stages:
        pts = [(offset + r["epoch"], r[key]) for r in stage.criteria if r.get(key) is not None]
        if pts:
            out.append(([p[0] for p in pts], [p[1] for p in pts]))
        if stage.criteria:
            offset += max(r["epoch"] for r in stage.criteria)
    return out


SELECTED_STYLE = {"stage1": ("black", "--"), "stage2": ("darkred", "-.")}


def _selected_marks(record: WorkspaceRecord) -> list[tuple[float, str, str]]:
    """(x, label, stage) of each stage's selected model (as ``_criteria_segments`` places it)."""
    out, offset = [], 0
    for stage in record.stages:
        if stage.selected is not None:
            what = " (the model it started from)" if stage.selected == 0 and offset else ""
            out.append((offset + stage.selected, f"selected, {stage.stage}{what}", stage.stage))
        if stage.criteria:
            offset += max(r["epoch"] for r in stage.criteria)
    return out


def _criteria_panel(record: WorkspaceRecord, title: str, ylabel: str,
                    lines: list[tuple[str, str, str | None, str]], note: str = "") -> Panel | None:
    """A panel of criteria ``lines`` (key, legend label, colour, line style) per model, with
    the stage boundary and the selected models; None when none of the keys was logged."""
    if not any(_criteria_segments(record, key) for key, *_ in lines):
        return None

    def draw(ax: Axes) -> None:
        for key, label, colour, style in lines:
            segments = _criteria_segments(record, key)
            if segments:
                _plot_segments(ax, segments, label=label, color=colour, ls=style)
        stage1 = record.stages[0].criteria if record.stages else []
        if len(record.stages) > 1 and stage1:
            x = max(r["epoch"] for r in stage1)
            ax.axvline(x, color="grey", ls=":", lw=1)
            ax.text(x + 0.1, 0.98, "stage 2 ->", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="grey")
        for x, label, stage in _selected_marks(record):
            colour, style = SELECTED_STYLE.get(stage, ("black", "--"))
            ax.axvline(x, color=colour, ls=style, lw=1.4, label=label)
        _title(ax, title, note)
        ax.set(xlabel="model: epochs trained (stage 2's 0: the model it started from)",
               ylabel=ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return draw


def selection_curves(record: WorkspaceRecord, out: Path) -> Path | None:
    return _grid(f"{record.label}: label-free criteria of each model (train images only; "
                 "vertical lines: the selected models)",
                 selection_panels(record), out / "selection.png")


def selection_panels(record: WorkspaceRecord) -> list[Panel]:
    """The criteria of each model (docs/selection.md): eps robustness, stability,
    cross-modality consistency, collapse alarms; those logged."""
    panels = [
        _criteria_panel(record, "eps robustness", "share of images",
                        [("eps_robustness", "eps robustness", "tab:blue", "-"),
                         ("independence", "independence", "tab:cyan", "--"),
                         ("compactness", "compactness", "tab:purple", ":")],
                        note="higher: images in clusters that keep their members when DBSCAN's "
                             "eps moves by select.eps_delta either way"),
        _criteria_panel(record, "stability against the previous model's labels", "score",
                        [("label_ari", "ARI, each modality (mean)", "tab:orange", "-"),
                         ("label_nmi", "NMI, each modality (mean)", "tab:orange", "--"),
                         ("unified_ari", "ARI of unified ids", "tab:green", "-"),
                         ("pairs_kept", "cross-modality pairs kept", "tab:red", "-")],
                        note="higher: labels change less; a collapsed model is stable too"),
        _criteria_panel(record, "cross-modality consistency of the clusters", "value",
                        [("mutual_nn", "mutual-NN centroid rate (higher)", "tab:blue", "-"),
                         ("matching_cost", "matching cost (lower)", "tab:red", "-"),
                         ("association_cost", "association cost (lower)", "tab:red", "--")]),
        _criteria_panel(record, "collapse alarms", "share of a modality's images",
                        [("largest_share", "largest cluster (worse modality)", "tab:red", "-"),
                         ("outlier_share", "outliers (worse modality)", "tab:gray", "-")],
                        note="select.max_largest_share: no model whose largest cluster holds more "
                             "is selected"),
        _criteria_panel(record, "effective rank of the train features (RankMe)", "rank",
                        [("effective_rank", "effective rank", "tab:green", "-")],
                        note="near 1: the features collapse to one direction"),
    ]
    return [p for p in panels if p]


def _cmc_panel(title: str, curves: list[tuple[str, dict[str, Any]]]) -> Panel:
    def draw(ax: Axes) -> None:
        for label, mean in curves:
            cmc = [100 * v for v in mean["cmc"]]
            ranks = list(range(1, len(cmc) + 1))
            line = ax.plot(ranks, cmc, marker=".", label=f"{label} (mAP {100 * mean['mAP']:.1f})")[0]
            std = mean.get("cmc_std")
            if std and mean.get("trials", 1) > 1:
                lo = [c - 100 * s for c, s in zip(cmc, std)]
                hi = [c + 100 * s for c, s in zip(cmc, std)]
                ax.fill_between(ranks, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set(title=title, xlabel="rank", ylabel="matching rate (%)", ylim=(0, 100))
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    return draw


def cmc_curves(record: WorkspaceRecord, out: Path) -> Path | None:
    by_protocol: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for ev in record.evaluations:
        title = ev.mode + (f" ({ev.variant})" if ev.variant else "")
        by_protocol.setdefault(title, []).append((ev.checkpoint, ev.mean))
    panels = [_cmc_panel(f"CMC, {t} (band: ± std over trials)", c) for t, c in by_protocol.items()]
    return _grid(f"{record.label}: evaluations", panels, out / "cmc.png")


def _final(record: WorkspaceRecord) -> dict[str, dict[str, Any]]:
    """{protocol: mean} of each protocol's latest checkpoint (stage 2 before stage 1 ...)."""
    best: dict[str, tuple[int, dict[str, Any]]] = {}
    for ev in record.evaluations:
        rank = CHECKPOINT_ORDER.index(ev.checkpoint) if ev.checkpoint in CHECKPOINT_ORDER else -1
        title = f"{ev.mode}{f' ({ev.variant})' if ev.variant else ''}"
        if title not in best or rank > best[title][0]:
            best[title] = (rank, ev.mean)
    return {t: m for t, (_, m) in best.items()}


def _compare_bounds(ax: Axes, records: list[WorkspaceRecord], colours: dict[str, str]) -> None:
    """The stage boundary of each workspace's own schedule: one grey line when they agree,
    else one line per boundary in the colour of the workspaces that have it."""
    bounds: dict[float, list[WorkspaceRecord]] = {}
    for rec in records:
        x = _boundary(rec)
        if x is not None:
            bounds.setdefault(x, []).append(rec)
    for x, recs in bounds.items():
        colour = "grey" if len(bounds) == 1 else colours.get(recs[0].label, "grey")
        ax.axvline(x, color=colour, ls=":", lw=1)
        ax.text(x + 0.1, 0.98, "stage 2 ->", transform=ax.get_xaxis_transform(), va="top",
                fontsize=8, color=colour)


def compare_curves(records: list[WorkspaceRecord], out: Path) -> list[Path]:
    """Overlaid per-epoch curves and CMC curves of several workspaces."""
    def overlay(title: str, ylabel: str, key: str) -> Panel | None:
        if not any(_segments(r, key) for r in records):
            return None

        def draw(ax: Axes) -> None:
            colours = {}
            for rec in records:
                segments = _segments(rec, key)
                if segments:
                    before = len(ax.lines)
                    _plot_segments(ax, segments, label=rec.label)
                    colours[rec.label] = ax.lines[before].get_color()
            ax.set(title=title, xlabel="epoch (stage 1, then stage 2)", ylabel=ylabel)
            _compare_bounds(ax, records, colours)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        return draw

    panels = [overlay("total loss", "loss (mean of logged steps)", "loss"),
              overlay("visible pseudo labels: ARI (diagnostic)", "ARI", "vis_ari"),
              overlay("infrared pseudo labels: ARI (diagnostic)", "ARI", "ir_ari"),
              overlay("association accuracy (diagnostic)", "fraction", "association_accuracy"),
              overlay("clusters, visible", "clusters", "vis_clusters"),
              overlay("clusters, infrared", "clusters", "ir_clusters"),
              overlay("test-set monitoring mAP (never selects)", "mAP", "monitor_mAP")]
    written = [_grid(f"{len(records)} workspaces: training", [p for p in panels if p],
                     out / "compare_curves.png")]
    finals = [(r.label, _final(r)) for r in records]
    protocols = sorted({t for _, f in finals for t in f})
    cmc = [_cmc_panel(f"CMC, {t}, latest checkpoint", [(lab, f[t]) for lab, f in finals if t in f])
           for t in protocols]
    written.append(_grid(f"{len(records)} workspaces: evaluations", cmc, out / "compare_cmc.png"))
    return [p for p in written if p is not None]
