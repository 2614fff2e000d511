"""`dmdl report`: tables and figures from what training and evaluation logged.

The table and figure logic runs on workspaces whose ``log.jsonl`` and ``eval/*.json`` are written
here by hand (known numbers, known means); one real tiny run checks the whole path end to end.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from conftest import (HAS_TENSORBOARD, STAGE1_SETS, assert_refused, copy_workspace,
                      discard_when_done, invoke, linked_workspace, set_args, tree_snapshot)
from dmdl_cli.data.index import IndexTable, write_index
from dmdl_cli.recipe import Recipe
from dmdl_cli.report import figures
from dmdl_cli.report.logs import epoch_rows, read_workspace
from dmdl_cli.report.tables import comparison_table, group_variants
from dmdl_cli.training.tensorboard import scalars


def _labels(epoch: int, vis: int, ir: int, ari: float, **extra) -> dict:
    return {"kind": "labels", "epoch": epoch, "step": 0,
            "visible": {"n": 40, "clusters": vis, "outliers": 2, "ari": ari, "nmi": ari + 0.2},
            "infrared": {"n": 20, "clusters": ir, "outliers": 1, "ari": ari / 2, "nmi": ari},
            **extra}


def _stage_records(stage: str, epochs: int, base_loss: float) -> list[dict]:
    out = [{"kind": "start", "epoch": 0, "step": 0, "stage": stage}]
    for e in range(epochs):
        extra = {"association_accuracy": 0.1 * (e + 1), "unified_ids": 5 + e} if stage == "stage2" else {}
        out.append(_labels(e, 10 + e, 6 + e, 0.2 + 0.1 * e, **extra))
        out.append({"kind": "step", "epoch": e, "step": 10, "loss": base_loss - e, "contrast": 2.0})
        out.append({"kind": "step", "epoch": e, "step": 20, "loss": base_loss - e - 1, "contrast": 1.0})
        out.append({"kind": "speed", "epoch": e, "step": 20, "images_per_s": 100.0 + e})
        out.append({"kind": "epoch", "epoch": e, "step": 20, "seconds": 3.5, "lr": 3.5e-4})
    out.append({"kind": "end", "epoch": epochs, "step": 0})
    return out


def _eval(ws: Path, mode: str, checkpoint: str, rank1: float, mAP: float) -> None:
    cmc = [min(1.0, rank1 + 0.1 * r) for r in range(20)]
    data = {"dataset": "synthetic", "protocol": {"mode": mode, "trials": 2, "shots": 1, "rerank": False},
            "checkpoint": {"name": checkpoint}, "recipe_hash": "x",
            "mean": {"cmc": cmc, "cmc_std": [0.01] * 20, "mAP": mAP, "mAP_std": 0.02, "mINP": mAP / 2,
                     "mINP_std": 0.01, "trials": 2}}
    (ws / "eval").mkdir(parents=True, exist_ok=True)
    (ws / "eval" / f"{mode}-{checkpoint}.json").write_text(json.dumps(data))


def fake_workspace(root: Path, seed: int, mAP: float, cai: bool = True, workers: int = 4) -> Path:
    """A workspace holding only what `dmdl report` reads: recipe, two stage logs, evaluations."""
    recipe = Recipe()
    recipe.train.seed, recipe.cai.enabled, recipe.run.workers = seed, cai, workers
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(recipe.to_yaml())
    for stage, epochs in (("stage1", 2), ("stage2", 3)):
        (root / stage).mkdir()
        lines = [json.dumps(r) for r in _stage_records(stage, epochs, 10.0)]
        (root / stage / "log.jsonl").write_text("\n".join(lines) + "\n{\"kind\": \"st")  # a cut last line
    for mode in ("all-search", "indoor-search"):
        _eval(root, mode, "random-init", 0.2, 0.15)
        _eval(root, mode, "stage2-final", 0.4, mAP)
    return root


def test_epoch_rows_fold_the_log_into_one_row_per_epoch(tmp_path: Path) -> None:
    rows = epoch_rows(_stage_records("stage2", 3, 10.0), "stage2")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert first["loss"] == pytest.approx(9.5)  # mean of the two logged steps 10 and 9
    assert first["loss_contrast"] == pytest.approx(1.5)
    assert (first["vis_clusters"], first["ir_clusters"], first["vis_outliers"]) == (10, 6, 2)
    assert first["association_accuracy"] == pytest.approx(0.1) and first["unified_ids"] == 5
    assert (first["lr"], first["images_per_s"], first["seconds"]) == (3.5e-4, 100.0, 3.5)
    assert rows[2]["vis_ari"] == pytest.approx(0.4) and rows[2]["ir_nmi"] == pytest.approx(0.4)


def test_one_workspace_prints_the_table_and_writes_tables_and_figures(tmp_path: Path) -> None:
    ws = fake_workspace(tmp_path / "ws", seed=1, mAP=0.30)
    result = invoke(["report", ws])
    assert result.exit_code == 0, result.output
    assert "per epoch" in result.output and "vis clu/out" in result.output
    assert "10/2" in result.output  # visible clusters/outliers of stage 1, epoch 1
    out = ws / "report"
    for name in ("training_curves.png", "pseudo_labels.png", "cmc.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
        assert str(out / name) in result.output.replace("\n", "")
    with open(out / "per_epoch.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and rows[0]["stage"] == "stage1"
    assert float(rows[4]["association_accuracy"]) == pytest.approx(0.3)
    assert "| stage2 | 3 |" in (out / "per_epoch.md").read_text()
    assert "stage2-final" in (out / "evaluations.md").read_text()


def test_two_workspaces_print_the_comparison_with_mean_and_std(tmp_path: Path) -> None:
    a = fake_workspace(tmp_path / "seed1", seed=1, mAP=0.40)
    b = fake_workspace(tmp_path / "seed2", seed=2, mAP=0.50)
    result = invoke(["report", a, b, "--out", tmp_path / "cmp"])
    assert result.exit_code == 0, result.output
    assert "comparison of 2 workspaces" in result.output
    assert "45.00 ± 5.00" in result.output  # mAP of stage2-final over the two seeds
    assert "40.0, 50.0" in result.output
    for name in ("comparison.md", "comparison.csv", "compare_curves.png", "compare_cmc.png",
                 "seed1/cmc.png", "seed2/training_curves.png"):
        assert (tmp_path / "cmp" / name).is_file(), name


def test_variants_are_grouped_apart_and_named_by_what_differs(tmp_path: Path) -> None:
    # run.workers changes no result: the two cai runs are one variant although it differs
    records = [read_workspace(fake_workspace(tmp_path / f"w{i}", seed=i, mAP=m, cai=cai, workers=i))
               for i, (m, cai) in enumerate([(0.4, True), (0.5, True), (0.2, False)])]
    groups = group_variants(records)
    assert sorted((name, len(members)) for name, members in groups) == [
        ("cai.enabled=False", 1), ("cai.enabled=True", 2)]
    table = comparison_table(records)
    row = next(r for r in table.raw if r["variant"] == "cai.enabled=True" and r["checkpoint"] == "stage2-final"
               and r["protocol"] == "all-search")
    assert row["mAP_mean"] == pytest.approx(0.45) and row["mAP_std"] == pytest.approx(0.05)
    assert row["runs"] == 2


def _drawn(panels) -> dict[str, Axes]:
    """{first title line: axes} of ``panels`` drawn on one figure."""
    fig = Figure()
    out = {}
    for panel in panels:
        ax = fig.add_subplot()
        panel(ax)
        out[ax.get_title().split("\n")[0]] = ax
    return out


def _lines(ax: Axes, label: str) -> list[list[float]]:
    """x data of the lines of a legend entry (a stage's continuation has no label of its own)."""
    found, out = False, []
    for line in ax.get_lines():
        if line.get_label() == label:
            found = True
        elif found and line.get_label() != "_nolegend_":
            break
        if found:
            out.append([float(x) for x in line.get_xdata()])
    return out


def test_figures_draw_each_stage_apart_and_only_what_was_logged(tmp_path: Path) -> None:
    ws = fake_workspace(tmp_path / "ws", seed=1, mAP=0.3)  # stage 1: 2 epochs, stage 2: 3
    record = read_workspace(ws)
    training = _drawn(figures.training_panels(record))
    # no line joins stage 1's last learning rate to stage 2's first
    assert _lines(training["learning rate"], "lr") == [[1.0, 2.0], [3.0, 4.0, 5.0]]
    # monitoring was off: no panel for it
    assert not any("monitoring" in title for title in training)
    labels = _drawn(figures.pseudo_label_panels(record))
    association = labels["cross-modality association, stage 2 (diagnostic)"]
    assert _lines(association, "association accuracy") == [[3.0, 4.0, 5.0]]
    assert [line.get_label() for line in association.get_lines()] == ["association accuracy"]


def test_the_loss_panel_shows_the_triplet_weight_that_makes_the_total_rise(tmp_path: Path) -> None:
    ws = fake_workspace(tmp_path / "ws", seed=1, mAP=0.3)
    record = read_workspace(ws)
    record.recipe["stage1"]["triplet_ramp"] = [[0, 0.5]]  # 0 in epoch 0, 0.5 after it
    panels = figures.training_panels(record)
    fig = Figure()
    ax = fig.add_subplot()
    panels[0](ax)
    assert "triplet weight" in ax.get_title()
    twin = [other for other in fig.axes if other is not ax][0]
    weight = twin.get_lines()[0]
    assert list(weight.get_xdata()) == [0, 1, 2] and list(weight.get_ydata()) == [0.0, 0.5, 0.5]


def test_association_chance_and_true_identities_are_drawn_when_known(tmp_path: Path) -> None:
    ws = fake_workspace(tmp_path / "ws", seed=1, mAP=0.3)
    log = ws / "stage2" / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()[:-1]]
    for rec in records:
        if rec["kind"] == "labels":
            rec["association_chance"] = 0.05
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (ws / "data").mkdir()
    write_index(IndexTable(paths=[f"/x/{i}.jpg" for i in range(8)], pids=[1, 1, 2, 3, 1, 2, 9, 9],
                           cams=[1, 2, 1, 1, 3, 3, 1, 3], modality=[0, 0, 0, 0, 1, 1, 0, 1],
                           split=["train"] * 6 + ["test"] * 2), ws / "data" / "index.csv")
    record = read_workspace(ws)
    assert record.true_ids == {"vis": 3, "ir": 2}  # train identities only
    labels = _drawn(figures.pseudo_label_panels(record))
    chance = _lines(labels["cross-modality association, stage 2 (diagnostic)"], "a random linking (chance)")
    assert chance == [[3.0, 4.0, 5.0]]
    clusters = labels["clusters per modality"]
    lines = {line.get_label(): line for line in clusters.get_lines()}
    assert list(lines["true visible identities: 3 (diagnostic)"].get_ydata()) == [3, 3]
    assert list(lines["true infrared identities: 2 (diagnostic)"].get_ydata()) == [2, 2]


def test_a_workspace_without_evaluations_is_shown_and_long_variants_get_a_legend(tmp_path: Path) -> None:
    a = read_workspace(fake_workspace(tmp_path / "a", seed=1, mAP=0.4))
    b = fake_workspace(tmp_path / "b", seed=1, mAP=0.4, cai=False)
    for path in (b / "eval").iterdir():
        path.unlink()
    table = comparison_table([a, read_workspace(b)])
    variants = [row[0] for row in table.rows]
    assert "cai.enabled=False" in variants and table.rows[-1][1] == "no evaluation"
    assert table.rows[-1][-2] == "0/1"
    # each variant is named on its first row only
    assert variants.count("cai.enabled=True") == 1 and len(table.rows) == 5
    # many differing keys: letters, and a legend that says what each one is, once
    c = fake_workspace(tmp_path / "c", seed=1, mAP=0.5, cai=False)
    recipe = Recipe()
    recipe.cai.enabled, recipe.cbt.augment, recipe.cbt.refine, recipe.cbt.align = False, False, False, False
    (c / "recipe.yaml").write_text(recipe.to_yaml())
    table = comparison_table([a, read_workspace(c)])
    assert [row[0] for row in table.rows if row[0]] == ["A", "B"]
    assert table.notes[1] == ("B: cai.enabled=False, cbt.align=False, cbt.augment=False, "
                              "cbt.refine=False (c)")
    assert table.markdown().rstrip().endswith(table.notes[1])


def test_compared_workspaces_show_each_schedules_stage_boundary(tmp_path: Path) -> None:
    a = read_workspace(fake_workspace(tmp_path / "a", seed=1, mAP=0.4))
    b = fake_workspace(tmp_path / "b", seed=2, mAP=0.5)
    log = b / "stage1" / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in _stage_records("stage1", 4, 10.0)) + "\n")
    records = [a, read_workspace(b)]
    fig = Figure()
    ax = fig.add_subplot()
    figures._compare_bounds(ax, records, {"a": "tab:blue", "b": "tab:orange"})
    assert sorted(line.get_xdata()[0] for line in ax.get_lines()) == [2.5, 4.5]


def test_a_folder_without_logs_or_evaluations_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_refused(invoke(["report", tmp_path / "empty"]), "no training log", "dmdl evaluate")
    assert_refused(invoke(["report", tmp_path / "missing"]), "does not exist")


def test_tensorboard_scalars_of_log_records() -> None:
    tags = scalars(_labels(0, 10, 6, 0.3, association_accuracy=0.5))
    assert tags["labels/visible_clusters"] == 10 and tags["labels/infrared_ari"] == pytest.approx(0.15)
    assert tags["labels/association_accuracy"] == 0.5
    assert scalars({"kind": "step", "epoch": 0, "step": 10, "loss": 2.5}) == {"loss/loss": 2.5}
    assert scalars({"kind": "start", "epoch": 0, "step": 0}) == {}
    criteria = scalars({"kind": "criteria", "epoch": 2, "step": 0, "eps_robustness": 0.8,
                        "label_ari": None, "previous_epoch": 1, "visible": {"clusters": 7}})
    assert criteria == {"criteria/eps_robustness": 0.8, "criteria/visible_clusters": 7.0}


# -- one real tiny run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(trained_tiny, tmp_path_factory, request) -> Path:
    """The session's trained tiny workspace (two epochs per stage, epoch models kept; TensorBoard
    event files when installed), linked, after an all-search evaluation; stage 2's first epoch
    model removed, as a run that kept none would have it."""
    ws = linked_workspace(trained_tiny, tmp_path_factory.mktemp("report") / "ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMDL_NO_PROGRESS", "1")
        result = invoke(["evaluate", "--workspace", ws, "--mode", "all-search",
                         *set_args(["eval.trials=2"])])
        assert result.exit_code == 0, result.output
    (ws / "stage2" / "epoch-001.pt").unlink()  # a hard link: trained_tiny keeps its file
    yield ws
    discard_when_done(request, ws.parent)


def test_report_of_a_real_tiny_run(trained: Path, tmp_path: Path) -> None:
    result = invoke(["report", trained, "--out", tmp_path / "r"])
    assert result.exit_code == 0, result.output
    assert "stage1" in result.output and "stage2" in result.output and "all-search" in result.output
    rows = list(csv.DictReader(open(tmp_path / "r" / "per_epoch.csv")))
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("stage1", "1"), ("stage1", "2"), ("stage2", "1"), ("stage2", "2")]
    assert all(float(r["lr"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert rows[2]["association_accuracy"] != ""  # the synthetic set has identities
    for name in ("training_curves.png", "pseudo_labels.png", "selection.png", "cmc.png"):
        assert (tmp_path / "r" / name).stat().st_size > 10_000, name
    # the label-free criteria of each model: the one a stage started from, then after each epoch,
    # named by its kept file (stage 2's epoch-001.pt was removed: not kept)
    criteria = list(csv.DictReader(open(tmp_path / "r" / "criteria.csv")))
    assert [(r["stage"], r["epochs trained"], r["model"]) for r in criteria] == [
        ("stage1", "0", "untrained"), ("stage1", "1", "epoch-001.pt"), ("stage1", "2", "final.pt"),
        ("stage2", "0", "start"), ("stage2", "1", "(not kept)"), ("stage2", "2", "final.pt")]
    assert all(0 <= float(r["eps_robustness"]) <= 1 for r in criteria)
    assert criteria[4]["pairs_kept"] != "" and criteria[3]["pairs_kept"] == ""
    assert "label-free criteria per model" in result.output


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed: the refusal cannot happen")
def test_tensorboard_without_the_package_is_one_error_line_and_writes_nothing(tiny_workspace, tmp_path) -> None:
    ws = copy_workspace(tiny_workspace, tmp_path)
    before = tree_snapshot(ws)
    sets = set_args([*STAGE1_SETS, "run.tensorboard=true"])
    result = invoke(["pretrain-single", "--workspace", ws, *sets])
    assert_refused(result, "tensorboard", "pip install")
    assert tree_snapshot(ws) == before


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the optional tensorboard extra is not installed")
def test_tensorboard_event_files_are_written_when_asked(trained: Path) -> None:
    events = list((trained / "stage2" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
