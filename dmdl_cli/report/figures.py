"""PNG figures of a report, drawn with matplotlib's Agg canvas (no display, no global backend).

One workspace: ``training_curves.png`` (losses per stage, learning rate, speed, test-set
monitoring when logged), ``pseudo_labels.png`` (clusters, outliers, ARI/NMI, association
accuracy) and ``cmc.png`` (every evaluation). Several: ``compare_curves.png`` and
``compare_cmc.png`` with one line per workspace.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dmdl_cli.atomic import atomic_write_bytes
from dmdl_cli.report.logs import CHECKPOINT_ORDER, StageLog, WorkspaceRecord
from dmdl_cli.stages import STAGES

MODALITY_STYLE = {"vis": ("visible", "tab:orange"), "ir": ("infrared", "tab:purple")}
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
    fig = Figure(figsize=(6.4 * cols, 3.8 * rows), layout="constrained")
    fig.suptitle(title, fontsize=13)
    for i, draw in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        draw(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and ranks are whole
    return _save(fig, path)


def _epochs(record: WorkspaceRecord) -> list[tuple[float, dict[str, Any]]]:
    """(x, row) over both stages: stage 2's epochs continue after stage 1's."""
    out, offset = [], 0
    for stage in record.stages:
        out += [(offset + row["epoch"], row) for row in stage.epochs]
        offset += len(stage.epochs)
    return out


def _stage_bounds(ax: Axes, record: WorkspaceRecord) -> None:
    if len(record.stages) > 1 and record.stages[0].epochs:
        ax.axvline(len(record.stages[0].epochs) + 0.5, color="grey", ls=":", lw=1)
        ax.text(len(record.stages[0].epochs) + 0.6, 0.98, "stage 2 ->", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8, color="grey")


def _series(record: WorkspaceRecord, key: str) -> tuple[list[float], list[float]]:
    pts = [(x, row[key]) for x, row in _epochs(record) if key in row]
    return [p[0] for p in pts], [p[1] for p in pts]


def _loss_panel(stage: StageLog) -> Panel:
    def draw(ax: Axes) -> None:
        keys = [k for k in stage.steps[0] if k not in ("kind", "epoch", "step", "x")]
        for key in keys:
            xs = [s["x"] for s in stage.steps if key in s]
            ax.plot(xs, [s[key] for s in stage.steps if key in s], marker=".",
                    lw=2.2 if key == "loss" else 1.2, label="total" if key == "loss" else key)
        ax.set(title=f"losses, {STAGES[stage.stage].title if stage.stage in STAGES else stage.stage}",
               xlabel="epochs done", ylabel="loss (logged steps)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return draw


def _metric_panel(record: WorkspaceRecord, title: str, ylabel: str,
                  lines: list[tuple[str, str, str | None]], log_y: bool = False) -> Panel | None:
    """A per-epoch panel of ``lines`` (key, legend label, colour); None when none is logged."""
    if not any(_series(record, key)[0] for key, _, _ in lines):
        return None

    def draw(ax: Axes) -> None:
        for key, label, colour in lines:
            xs, ys = _series(record, key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=label, color=colour,
                        ls="--" if key.endswith("nmi") else "-")
        if log_y:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="epoch (stage 1, then stage 2)", ylabel=ylabel)
        _stage_bounds(ax, record)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return draw


def training_curves(record: WorkspaceRecord, out: Path) -> Path | None:
    panels: list[Panel | None] = [_loss_panel(s) for s in record.stages if s.steps]
    panels += [
        _metric_panel(record, "learning rate", "lr", [("lr", "lr", "tab:blue")], log_y=True),
        _metric_panel(record, "throughput", "training images / s", [("images_per_s", "images/s", "tab:green")]),
        _metric_panel(record, "epoch time", "seconds (labelling + training)", [("seconds", "seconds", "tab:red")]),
        _metric_panel(record, "test-set monitoring (never selects a checkpoint)", "fraction",
                      [("monitor_rank1", "Rank-1", "tab:blue"), ("monitor_mAP", "mAP", "tab:red")]),
    ]
    return _grid(f"{record.label}: training", [p for p in panels if p], out / "training_curves.png")


def pseudo_label_curves(record: WorkspaceRecord, out: Path) -> Path | None:
    def per_modality(stat: str, label: str) -> list[tuple[str, str, str | None]]:
        return [(f"{p}_{stat}", f"{name} {label}", colour) for p, (name, colour) in MODALITY_STYLE.items()]

    panels = [
        _metric_panel(record, "clusters per modality", "clusters", per_modality("clusters", "")),
        _metric_panel(record, "outliers per modality (left out of the epoch)", "images",
                      per_modality("outliers", "")),
        _metric_panel(record, "pseudo labels vs true identities (diagnostic only)", "score",
                      per_modality("ari", "ARI") + per_modality("nmi", "NMI")),
        _metric_panel(record, "cross-modality association (stage 2)", "fraction",
                      [("association_accuracy", "association accuracy (diagnostic)", "tab:blue"),
                       ("mean_confidence", "mean label confidence", "tab:gray")]),
    ]
    return _grid(f"{record.label}: pseudo labels", [p for p in panels if p], out / "pseudo_labels.png")


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


def compare_curves(records: list[WorkspaceRecord], out: Path) -> list[Path]:
    """Overlaid per-epoch curves and CMC curves of several workspaces."""
    def overlay(title: str, ylabel: str, key: str) -> Panel | None:
        if not any(_series(r, key)[0] for r in records):
            return None

        def draw(ax: Axes) -> None:
            for rec in records:
                xs, ys = _series(rec, key)
                if xs:
                    ax.plot(xs, ys, marker="o", ms=3, label=rec.label)
            ax.set(title=title, xlabel="epoch (stage 1, then stage 2)", ylabel=ylabel)
            _stage_bounds(ax, records[0])
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
