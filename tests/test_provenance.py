"""Recipe provenance through the CLI: each stage keeps the recipe it ran with, a later stage
builds on it without repeating the overrides, and a real conflict names the differing keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (STAGE1_SETS, STAGE2_SETS, assert_refused, copy_workspace,
                      discard_when_done, invoke, set_args)
from dmdl_cli.provenance import differences
from dmdl_cli.recipe import load_recipe

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# STAGE1_SETS are given only to pretrain-single; train-cross must inherit them.

@pytest.fixture(scope="module")
def stage1_with_sets(tiny_workspace, tmp_path_factory, request) -> Path:
    ws = copy_workspace(tiny_workspace, tmp_path_factory.mktemp("prov"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMDL_NO_PROGRESS", "1")
        result = invoke(["pretrain-single", "-w", ws, *set_args(STAGE1_SETS)])
    assert result.exit_code == 0, result.output
    yield ws
    discard_when_done(request, ws.parent)


def test_stage_writes_its_recipe_and_the_ledger_its_overrides(stage1_with_sets):
    ws = stage1_with_sets
    saved = load_recipe(ws / "stage1" / "recipe.yaml")
    workspace_recipe = load_recipe(ws / "recipe.yaml")
    assert saved.stage1.epochs == 1 and workspace_recipe.stage1.epochs != 1
    meta = torch.load(ws / "stage1" / "final.pt", map_location="cpu", weights_only=False)["meta"]
    assert meta["recipe_hash"] == saved.hash() and meta["recipe"] == saved.to_dict()
    run = json.loads((ws / "manifest.json").read_text())["runs"][-1]
    assert run["stage"] == "pretrain-single"
    assert run["recipe_origin"]["overrides"] == STAGE1_SETS
    assert "stage1/recipe.yaml" in [o["path"] for o in run["outputs"]]


def test_plain_train_cross_builds_on_the_stage1_recipe(stage1_with_sets, tmp_path):
    ws = copy_workspace(stage1_with_sets, tmp_path)
    result = invoke(["train-cross", "-w", ws, *set_args(STAGE2_SETS)])
    assert result.exit_code == 0, result.output
    stage2 = load_recipe(ws / "stage2" / "recipe.yaml")
    assert stage2.stage1.epochs == 1 and stage2.cluster.min_samples == 2
    assert stage2.stage2.epochs == 1
    run = json.loads((ws / "manifest.json").read_text())["runs"][-1]
    assert run["recipe_origin"]["inherited"][0]["from"] == "stage1/recipe.yaml"
    assert f"results: {ws.resolve() / 'stage2'}" in result.output
    # the evaluation records the evaluated checkpoint's own recipe hash beside its own recipe
    result = invoke(["evaluate", "-w", ws, "--mode", "all-search", "--trials", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((ws / "eval" / "all-search-stage2-final.json").read_text())
    assert report["checkpoint"]["recipe_hash"] == stage2.hash()
    assert report["recipe"]["model"] == stage2.to_dict()["model"]


def test_an_explicit_stage1_value_that_differs_is_refused_naming_it(stage1_with_sets, snapshot):
    ws = stage1_with_sets
    before = snapshot(ws)
    result = invoke(["train-cross", "-w", ws, "--set", "stage1.epochs=2", "--set",
                     "cluster.min_samples=2", *set_args(STAGE2_SETS)])
    line = assert_refused(result, "stage1/final.pt", "stage1.epochs: 1 -> 2", "pretrain-single --force")
    assert "min_samples" not in line  # the same value as stage 1 is no conflict
    result = invoke(["evaluate", "-w", ws, "--set", "data.height=128"])
    assert_refused(result, "data.height: 64 -> 128")
    assert snapshot(ws) == before


def test_differences_lists_each_changed_leaf():
    made = {"stage1": {"epochs": 50, "lr": 0.1}, "model": {"arch": "resnet18"}}
    asked = {"stage1": {"epochs": 1, "lr": 0.1}, "model": {"arch": "resnet50"}}
    assert differences(made, asked, ("stage1", "model.arch")) == [
        "stage1.epochs: 50 -> 1", "model.arch: resnet18 -> resnet50"]
    assert differences(made, made, ("stage1", "model")) == []


def test_plain_resume_continues_with_the_partial_runs_own_recipe(stage1_with_sets, tmp_path):
    ws = copy_workspace(stage1_with_sets, tmp_path)
    (ws / "stage1" / "final.pt").unlink()  # as if killed after the last epoch's last.pt
    result = invoke(["pretrain-single", "-w", ws, "--resume"])
    assert result.exit_code == 0, result.output
    assert (ws / "stage1" / "final.pt").is_file()
    run = json.loads((ws / "manifest.json").read_text())["runs"][-1]
    assert run["recipe_origin"]["overrides"] == []
    assert [i["from"] for i in run["recipe_origin"]["inherited"]] == ["stage1/recipe.yaml"]
    assert load_recipe(ws / "stage1" / "recipe.yaml").stage1.epochs == 1


def test_resume_accepts_changed_run_keys(stage1_with_sets, tmp_path):
    """`run:` keys change how a run executes, never a result: a partial run resumes with other
    values (a `train:` key that changes a result is still refused)."""
    ws = copy_workspace(stage1_with_sets, tmp_path)
    (ws / "stage1" / "final.pt").unlink()  # as if killed after the last epoch's last.pt
    refused = invoke(["pretrain-single", "-w", ws, "--resume", "--set", "train.seed=9"])
    assert_refused(refused, "stage1/last.pt", "train.seed: 1 -> 9")
    result = invoke(["pretrain-single", "-w", ws, "--resume", "--set", "run.checkpoint_every=7",
                     "--set", "run.workers=0", "--set", "run.feature_batch=32"])
    assert result.exit_code == 0, result.output
    assert "resuming stage1" in result.output
    assert (ws / "stage1" / "final.pt").is_file()
    saved = load_recipe(ws / "stage1" / "recipe.yaml")
    assert (saved.run.checkpoint_every, saved.run.workers, saved.run.feature_batch) == (7, 0, 32)
    assert saved.stage1.epochs == 1  # the stage's own keys still come from its recipe


def test_train_cross_accepts_a_stage1_made_with_other_run_keys(stage1_with_sets, tmp_path):
    ws = copy_workspace(stage1_with_sets, tmp_path)
    made = load_recipe(ws / "stage1" / "recipe.yaml").run
    assert (made.workers, made.feature_batch) == (1, 128)
    result = invoke(["train-cross", "-w", ws, *set_args(STAGE2_SETS), "--set", "run.workers=0",
                     "--set", "run.feature_batch=64", "--set", "run.checkpoint_every=1"])
    assert result.exit_code == 0, result.output
    stage2 = load_recipe(ws / "stage2" / "recipe.yaml")
    assert (stage2.run.workers, stage2.run.feature_batch) == (0, 64)
    assert stage2.stage1.epochs == 1  # stage 1's result-deciding keys were inherited


def test_a_checkpoint_made_with_other_stage_values_is_refused_naming_them(tmp_path):
    """check_made_with, the one check of the recipe a checkpoint carries (stage 2's start,
    --resume): the differing keys of the stage's sections, from the checkpoint's own recipe."""
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.provenance import check_made_with
    from dmdl_cli.stages import stage_spec
    from dmdl_cli.training.hooks import checkpoint_meta
    from dmdl_cli.workspace import Workspace

    ws, spec = Workspace(tmp_path), stage_spec("stage1")
    made = load_recipe(REPO_RECIPES / "demo.yaml")
    meta = checkpoint_meta(made, spec, 0, 1, False)
    check_made_with(ws, spec, tmp_path / "stage1" / "last.pt", meta, made, "start again")
    # a stage-2 key changes nothing stage 1 made
    check_made_with(ws, spec, tmp_path / "x.pt", meta,
                    load_recipe(REPO_RECIPES / "demo.yaml", overrides=["stage2.k1_adopting=3"]), "")
    asked = load_recipe(REPO_RECIPES / "demo.yaml", overrides=["stage1.lr=0.001", "cluster.k1=12"])
    with pytest.raises(DmdlError) as err:
        check_made_with(ws, spec, tmp_path / "stage1" / "last.pt", meta, asked, "start again")
    assert str(err.value) == (
        "stage1/last.pt was made with other values than this command asks for (made with -> "
        "asked for): cluster.k1: 10 -> 12; stage1.lr: 0.00035 -> 0.001. Drop the "
        "--recipe/--overlay/--set that change them to build on it, or start again")
    # a checkpoint of an older dmdl named a key this one does not have
    old = {**meta, "recipe": {**meta["recipe"], "cluster": {**meta["recipe"]["cluster"], "k1_adopting": 5}},
           "stage_hash": "0" * 16}
    with pytest.raises(DmdlError, match=r"cluster.k1_adopting: 5 -> \(absent\)"):
        check_made_with(ws, spec, tmp_path / "old.pt", old, made, "start again")


def test_the_checkpoint_a_command_loads_is_resolved_once_from_the_table(tmp_path):
    from dmdl_cli.stages import UNTRAINED, resolve_checkpoint, stage_spec
    from dmdl_cli.workspace import Workspace

    ws = Workspace(tmp_path)
    evaluate, cluster = stage_spec("evaluate"), stage_spec("cluster")
    assert evaluate.loads_checkpoint and cluster.loads_checkpoint and not stage_spec("stage2").loads_checkpoint
    assert resolve_checkpoint(ws, evaluate, "imagenet") == UNTRAINED
    assert resolve_checkpoint(ws, evaluate, "~/m.pt") == Path("~/m.pt").expanduser()
    # nothing trained yet: evaluate has nothing to load, cluster takes the untrained backbone
    assert resolve_checkpoint(ws, evaluate, None) is None
    assert resolve_checkpoint(ws, cluster, None) == UNTRAINED
    for name in ("stage1/last.pt", "stage1/final.pt", "stage2/last.pt"):  # the newest stage result
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
        assert resolve_checkpoint(ws, evaluate, None) == resolve_checkpoint(ws, cluster, None) == tmp_path / name
