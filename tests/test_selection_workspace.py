"""Label-free selection on a trained tiny workspace (docs/selection.md): the criteria the training
logs, the criteria of kept checkpoints computed after training, `dmdl select` and what follows
its pointer (evaluate, cluster, export, train-cross with stage2.start_from: selected). None of
it reads a test row."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import (
    STAGE1_SETS,
    STAGE2_SETS,
    TRAINED_TINY_SETS,
    assert_refused,
    invoke,
    linked_workspace,
    set_args,
)
from dmdl_cli.atomic import sha256_file
from dmdl_cli.clustering.criteria import linked_pairs
from dmdl_cli.data.cache import open_cache
from dmdl_cli.data.index import INFRARED, VISIBLE, read_index, write_index
from dmdl_cli.recipe import load_recipe
from dmdl_cli.runtime import select_runtime
from dmdl_cli.selected import read_selection
from dmdl_cli.selection.offline import checkpoint_criteria, kept_checkpoints
from dmdl_cli.selection.rule import choose_epoch
from dmdl_cli.workspace import Workspace, load_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAINED_SETS = set_args(TRAINED_TINY_SETS)  # two epochs per stage, epoch models kept


@pytest.fixture(scope="module")
def trained(trained_tiny):
    """The session's trained tiny workspace (read only: tests that write use ``linked``)."""
    return Workspace(trained_tiny)


@pytest.fixture
def linked(trained, tmp_path):
    """A copy of the trained workspace (checkpoints hard-linked), removed after the test."""
    ws = linked_workspace(trained.root, tmp_path / "ws")
    yield ws
    shutil.rmtree(ws, ignore_errors=True)


def _no_nan(token: str):
    raise AssertionError(f"{token} in a log record: undefined criteria must be null")


def logged(root, stage: str) -> list[dict]:
    """The criteria records of a stage's log, read as strict JSON."""
    lines = (root / stage / "log.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=_no_nan) for line in lines]
    return [r for r in records if r["kind"] == "criteria"]


def _inputs(ws: Workspace, stage_name: str):
    recipe = load_recipe(ws.root / stage_name / "recipe.yaml")
    index = read_index(ws.index_path)
    cache = open_cache(ws.cache_path(recipe.data.height, recipe.data.width), len(index),
                       recipe.data.height, recipe.data.width)
    return recipe, index, cache


def test_training_logs_the_criteria_of_every_model(trained):
    for stage in ("stage1", "stage2"):
        records = logged(trained.root, stage)
        # one per model: the one it started from, after epoch 1, the final model
        assert [r["epoch"] for r in records] == [0, 1, 2]
        assert [r["previous_epoch"] for r in records] == [None, 0, 1]
        assert records[0]["label_ari"] is None
        for r in records:
            assert 0.0 <= r["eps_robustness"] <= 1.0 and r["effective_rank"] > 1.0
            assert r["clusters"] == r["visible"]["clusters"] + r["infrared"]["clusters"]
            if r["epoch"]:
                assert -1.0 <= r["label_ari"] <= 1.0 and 0.0 <= r["label_nmi"] <= 1.0
    s1, s2 = logged(trained.root, "stage1"), logged(trained.root, "stage2")
    assert "pairs_kept" not in s1[1] and "association_cost" not in s1[1]
    assert s2[0]["pairs_kept"] is None and 0.0 <= s2[1]["pairs_kept"] <= 1.0
    assert s2[1]["association_cost"] is not None


def test_a_resumed_stage_2_logs_what_an_uninterrupted_one_logs(trained, linked, monkeypatch):
    """Killed after its first epoch's checkpoint, stage 2 resumes with the previous epoch's
    clusters from last.pt: its stability criteria are those of the uninterrupted run."""
    from dmdl_cli.training import hooks

    original = hooks.CheckpointHook.on_epoch_end

    def stop_after_first_epoch(self, t):
        original(self, t)
        if t.epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(hooks.CheckpointHook, "on_epoch_end", stop_after_first_epoch)
    stopped = invoke(["train-cross", "--workspace", linked, "--force", "--deterministic",
                      *TRAINED_SETS])
    assert stopped.exit_code == 130 and not (linked / "stage2" / "final.pt").exists()
    monkeypatch.undo()
    result = invoke(["train-cross", "--workspace", linked, "--resume", "--deterministic",
                     *TRAINED_SETS])
    assert result.exit_code == 0 and "resuming stage2" in result.output, result.output
    resumed = logged(linked, "stage2")
    assert resumed == logged(trained.root, "stage2")
    assert resumed[1]["pairs_kept"] is not None and resumed[1]["label_ari"] is not None


def test_kept_checkpoints_by_epochs_trained(trained):
    s1 = kept_checkpoints(trained, "stage1")
    assert list(s1) == [0, 1, 2] and str(s1[0]) == "imagenet" and s1[2].name == "epoch-002.pt"
    s2 = kept_checkpoints(trained, "stage2")
    assert s2[0] == trained.root / "stage1" / "final.pt" and s2[1].parent.name == "stage2"


@pytest.mark.parametrize("stage_name, prefix", [("stage1", "stage1"), ("stage2", "cross")])
def test_offline_criteria_are_the_logged_ones(trained, stage_name, prefix):
    """After training, the kept checkpoints give the records the training logged (no BatchNorm
    re-estimation: epoch-NNN.pt is the model that labelled epoch NNN), from its label files."""
    recipe, index, cache = _inputs(trained, stage_name)
    records = list(checkpoint_criteria(trained, recipe, stage_name, index=index, cache=cache,
                                       runtime=select_runtime(recipe)))
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["previous_epoch"] for r in records] == [None, 0, 1]
    json.dumps(records, allow_nan=False)
    for offline, log in zip(records, logged(trained.root, stage_name)):
        for key, value in log.items():
            if isinstance(value, float):
                assert offline[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, log["epoch"])
            elif key not in ("visible", "infrared"):
                assert offline[key] == value, (key, log["epoch"])
    rows = index.rows(split="train")
    for rec in records[:2]:  # epochs 0 and 1 made the label files e001 and e002
        labels = load_labels(trained.root / "labels" / f"{prefix}-e{rec['epoch'] + 1:03d}.npz")[0][rows]
        per = {m: labels[index.modality[rows] == m] for m in (VISIBLE, INFRARED)}
        for m, name in ((VISIBLE, "visible"), (INFRARED, "infrared")):
            assert rec[name]["outlier_share"] == pytest.approx(np.mean(per[m] < 0))
            if stage_name == "stage1":  # stage 1's files hold each modality's own clusters
                assert rec[name]["clusters"] == len(np.unique(per[m][per[m] >= 0]))
        if stage_name == "stage2":  # stage 2's hold unified ids: the association is reproduced
            assert rec["linked_pairs"] == linked_pairs(per[VISIBLE], per[INFRARED])
    choice = choose_epoch(records, recipe.select)
    assert choice.epoch in (1, 2) and choice.criterion == recipe.select.criterion


def test_offline_criteria_never_read_a_test_image(trained):
    recipe, index, cache = _inputs(trained, "stage1")
    blanked = np.array(cache)  # (N_all, H, W, 3)
    blanked[index.rows(split="test")] = 0
    runtime = select_runtime(recipe)
    kwargs = dict(index=index, runtime=runtime, epochs=[2])
    real = list(checkpoint_criteria(trained, recipe, "stage1", cache=cache, **kwargs))
    assert list(checkpoint_criteria(trained, recipe, "stage1", cache=blanked, **kwargs)) == real


def _by_hand(records: list[dict]) -> int:
    """The default rule (label_ari, warm-up 1, guard 50 %, ties to the later), by hand."""
    eligible = [(r["label_ari"], r["epoch"]) for r in records
                if r["epoch"] >= 1 and r["label_ari"] is not None and r["largest_share"] <= 0.5]
    return max(eligible)[1] if eligible else records[-1]["epoch"]


def _without_test_rows(ws) -> None:
    """Remove the test split from the index (the manifest agrees) and zero the test rows of the
    image cache without their checksums: reading one would stop the command."""
    index = read_index(ws / "data" / "index.csv")
    test = index.rows(split="test")
    recipe = load_recipe(ws / "recipe.yaml")
    cache = np.memmap(ws / "data" / f"cache-{recipe.data.height}x{recipe.data.width}.u8",
                      dtype=np.uint8, mode="r+", shape=(len(index), recipe.data.height,
                                                        recipe.data.width, 3))
    cache[test] = 0
    cache.flush()
    del cache
    write_index(index.select(index.split != "test"), ws / "data" / "index.csv")
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest["dataset"]["index_sha256"] = sha256_file(ws / "data" / "index.csv")
    (ws / "manifest.json").write_text(json.dumps(manifest))


def test_select_follows_the_declared_rule_and_never_opens_a_test_row(trained, linked, tmp_path):
    result = invoke(["select", "--workspace", linked, "--stage", "both"])
    assert result.exit_code == 0, result.output
    pointers = {}
    for stage in ("stage1", "stage2"):
        epoch = _by_hand(logged(linked, stage))
        selection = read_selection(linked / stage / "selected.pt")
        model = f"{stage}/epoch-001.pt" if epoch == 1 else f"{stage}/final.pt"  # final: epoch 2
        assert (selection.stage, selection.epoch, selection.checkpoint) == (stage, epoch, model)
        assert selection.sha256 == sha256_file(linked / model)
        assert selection.criterion == "label_ari" and selection.recipe == f"{stage}/recipe.yaml"
        assert f"selected {stage}: epoch {epoch}" in result.output
        pointers[stage] = (linked / stage / "selected.pt").read_text()
    # the rule is the one the run declared when it started: a recipe file rewritten since (a
    # --resume with other select: values) is said, not followed
    start = json.loads((linked / "stage1" / "log.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and start["select"]["criterion"] == "label_ari"
    recipe_file = linked / "stage1" / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace("criterion: label_ari",
                                                           "criterion: last"))
    again = invoke(["select", "--workspace", linked, "--stage", "stage1"])
    assert again.exit_code == 0 and "declared another select: rule" in again.output
    assert (linked / "stage1" / "selected.pt").read_text() == pointers["stage1"]
    # the same answer from a workspace without its test split
    blind = linked_workspace(trained.root, tmp_path / "blind")
    _without_test_rows(blind)
    result = invoke(["select", "--workspace", blind, "--stage", "both"])
    assert result.exit_code == 0, result.output
    for stage in ("stage1", "stage2"):
        assert (blind / stage / "selected.pt").read_text() == pointers[stage]
    entry = [r for r in json.loads((blind / "manifest.json").read_text())["runs"]
             if r["stage"] == "select"][-1]
    read = [i["path"] for i in entry["inputs"]]
    assert not any(path.startswith("data/") for path in read), read  # no index, no cache
    assert {"stage1/log.jsonl", "stage2/recipe.yaml"} <= set(read)
    assert [o["path"] for o in entry["outputs"]] == ["stage1/selected.pt", "stage2/selected.pt"]
    shutil.rmtree(blind, ignore_errors=True)


def test_select_refuses_in_one_line(linked):
    assert_refused(invoke(["evaluate", "--workspace", linked, "--checkpoint", "selected"]),
                   "no model was selected", "dmdl select")
    for path in (linked / "stage1").glob("epoch-*.pt"):
        path.unlink()
    assert_refused(invoke(["select", "--workspace", linked, "--stage", "stage1"]),
                   "stage1 kept no epoch models", "final.pt", "--set run.keep_epochs=true")
    log = linked / "stage2" / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if '"criteria"' not in line))
    assert_refused(invoke(["select", "--workspace", linked]), "stage2/log.jsonl holds no criteria")
    log.unlink()
    assert_refused(invoke(["select", "--workspace", linked, "--stage", "stage2"]),
                   "stage2/log.jsonl is missing")
    (linked / "stage2" / "final.pt").unlink()
    assert_refused(invoke(["select", "--workspace", linked, "--stage", "stage2"]),
                   "stage2 is not finished", "--resume")
    assert not list(linked.glob("*/selected.pt"))


def test_evaluate_cluster_and_export_follow_the_selected_model(linked):
    assert invoke(["select", "--workspace", linked, "--stage", "stage1"]).exit_code == 0
    selection = read_selection(linked / "stage1" / "selected.pt")
    name = "stage1-" + selection.checkpoint.split("/")[1][:-3]  # stage1-epoch-001 / stage1-final
    result = invoke(["evaluate", "--workspace", linked, "--checkpoint", "selected", "--mode",
                     "all-search", "--set", "eval.trials=1"])
    assert result.exit_code == 0, result.output
    assert f"stage1/selected.pt names {selection.checkpoint}" in result.output
    assert (linked / "eval" / f"all-search-{name}.json").is_file()  # named after what it ran
    entry = json.loads((linked / "manifest.json").read_text())["runs"][-1]
    assert entry["info"]["selected"] == "stage1/selected.pt"
    assert selection.checkpoint in [i["path"] for i in entry["inputs"]]
    result = invoke(["cluster", "--workspace", linked, "--checkpoint", linked / "stage1" / "selected.pt"])
    assert result.exit_code == 0 and (linked / "labels" / f"cluster-{name}.npz").is_file()
    result = invoke(["export", "--workspace", linked, "--checkpoint", "selected", "--format", "onnx"])
    assert result.exit_code == 0 and "stage1/selected.pt names" in result.output, result.output
    # the model changed after it was chosen (trained again): refused, naming the fix
    target = linked / selection.checkpoint
    data = (linked / "stage2" / "final.pt").read_bytes()
    target.unlink()  # a hard link: replaced, not written into
    target.write_bytes(data)
    assert_refused(invoke(["evaluate", "--workspace", linked, "--checkpoint", "selected"]),
                   "has changed since", "dmdl select --workspace")


def test_train_cross_starts_from_stage_1_s_selected_model(linked):
    sets = set_args(STAGE1_SETS + STAGE2_SETS + ["stage1.epochs=2", "stage2.start_from=selected",
                                                 "select.between_stages=mutual_nn"])
    before = sha256_file(linked / "stage2" / "final.pt")
    assert_refused(invoke(["train-cross", "--workspace", linked, "--force", *sets]),
                   "stage2.start_from is selected", "dmdl select", "--stage stage1")
    assert sha256_file(linked / "stage2" / "final.pt") == before
    assert invoke(["select", "--workspace", linked, "--stage", "stage1"]).exit_code == 0
    chosen = read_selection(linked / "stage1" / "selected.pt")
    result = invoke(["train-cross", "--workspace", linked, "--force", "--deterministic", *sets])
    assert result.exit_code == 0, result.output
    assert f"stage 2 starts from {chosen.checkpoint} (stage 1's selected model" in result.output
    entry = [r for r in json.loads((linked / "manifest.json").read_text())["runs"]
             if r["stage"] == "train-cross"][-1]
    assert {"stage1/selected.pt", chosen.checkpoint} <= {i["path"] for i in entry["inputs"]}
    # stage 2's first record describes that very model: the same train features
    s1 = {r["epoch"]: r for r in logged(linked, "stage1")}
    start, final = logged(linked, "stage2")  # one epoch: the start model and the final one
    assert start["effective_rank"] == pytest.approx(s1[chosen.epoch]["effective_rank"], rel=1e-9)
    # one stage-2 epoch kept no epoch model; select.between_stages still chooses between the
    # final model and the one stage 2 started from, by mutual NN (the rule stage 2 declared)
    result = invoke(["select", "--workspace", linked, "--stage", "stage2"])
    assert result.exit_code == 0, result.output
    selection = read_selection(linked / "stage2" / "selected.pt")
    back = start["mutual_nn"] > final["mutual_nn"] and start["largest_share"] <= 0.5
    if back:
        assert (selection.epoch, selection.checkpoint) == (0, chosen.checkpoint)
    else:
        assert (selection.epoch, selection.checkpoint) == (1, "stage2/final.pt")
    assert selection.rule["between_stages"] == "mutual_nn"
