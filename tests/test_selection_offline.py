"""Criteria of kept checkpoints after training (dmdl_cli/selection/offline.py) on the tiny
workspace: they reproduce the training's own labels, and never read a test image."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import STAGE1_SETS, STAGE2_SETS, copy_workspace, discard_when_done, invoke, set_args
from dmdl_cli.clustering.criteria import linked_pairs
from dmdl_cli.data.cache import open_cache
from dmdl_cli.data.index import INFRARED, VISIBLE, read_index
from dmdl_cli.recipe import load_recipe
from dmdl_cli.runtime import select_runtime
from dmdl_cli.selection.offline import checkpoint_criteria, kept_checkpoints
from dmdl_cli.selection.rule import choose_epoch
from dmdl_cli.workspace import Workspace, load_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TWO_EPOCHS = ["stage1.epochs=2", "stage2.epochs=2", "run.keep_epochs=true"]


@pytest.fixture(scope="module")
def trained(tiny_workspace, tmp_path_factory, request):
    ws = copy_workspace(tiny_workspace, tmp_path_factory.mktemp("kept"))
    for command in ("pretrain-single", "train-cross"):
        result = invoke([command, "--workspace", ws, *set_args(STAGE1_SETS + STAGE2_SETS + TWO_EPOCHS)])
        assert result.exit_code == 0, result.output
    yield Workspace(ws)
    discard_when_done(request, ws.parent)


def _inputs(ws: Workspace, stage_name: str):
    recipe = load_recipe(ws.root / stage_name / "recipe.yaml")
    index = read_index(ws.index_path)
    cache = open_cache(ws.cache_path(recipe.data.height, recipe.data.width), len(index),
                       recipe.data.height, recipe.data.width)
    return recipe, index, cache


def test_kept_checkpoints_by_epochs_trained(trained):
    s1 = kept_checkpoints(trained, "stage1")
    assert list(s1) == [0, 1, 2] and str(s1[0]) == "imagenet" and s1[2].name == "epoch-002.pt"
    s2 = kept_checkpoints(trained, "stage2")
    assert s2[0] == trained.root / "stage1" / "final.pt" and s2[1].parent.name == "stage2"


@pytest.mark.parametrize("stage_name, prefix", [("stage1", "stage1"), ("stage2", "cross")])
def test_offline_criteria_reproduce_the_training_labels(trained, stage_name, prefix):
    recipe, index, cache = _inputs(trained, stage_name)
    records = list(checkpoint_criteria(trained, recipe, stage_name, index=index, cache=cache,
                                       runtime=select_runtime(recipe)))
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["previous_epoch"] for r in records] == [None, 0, 1]
    assert records[0]["label_ari"] is None and records[1]["label_ari"] is not None
    json.dumps(records, allow_nan=False)
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
