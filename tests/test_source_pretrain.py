"""benchmarks/source_pretrain.py: what it saves loads through model.pretrained, it reads visible
images of other people only, and it is idempotent."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmdl_cli.data.index import VISIBLE
from dmdl_cli.model.backbone import build_model
from dmdl_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sp = _load("source_pretrain")
TINY = dict(train_ids=4, heldout_ids=2, images_per_cam=2, epochs=1, iters=1, ids_per_batch=2,
            instances=2)


@pytest.fixture(scope="module")
def recipe():
    torch.set_num_threads(1)
    return load_recipe(REPO / "recipes" / "demo.yaml", overrides=["data.height=32", "data.width=16"])


def test_source_set_is_visible_only_and_holds_other_people(tmp_path, recipe):
    settings = sp.settings_from(recipe, TINY)
    data = sp.source_data(tmp_path, settings)
    assert (data.table.modality == VISIBLE).all()
    assert set(data.table.pids.tolist()) == set(range(1001, 1007))  # the demo set holds 1..90
    assert data.num_classes == 4 and len(data.heldout_rows) == 2 * 4 * 2
    assert (data.labels[data.heldout_rows] == -1).all()
    assert sorted(np.unique(data.labels[data.train_rows]).tolist()) == [0, 1, 2, 3]
    assert data.cache.shape[1:] == (32, 16, 3)


def test_saved_trunk_loads_through_model_pretrained_and_reruns_are_skipped(tmp_path, recipe):
    out = tmp_path / "source" / "backbone.pth"
    settings = sp.settings_from(recipe, TINY)
    sp.pretrain(recipe, out, settings)
    saved = torch.load(out, map_location="cpu", weights_only=True)  # a plain state dict
    assert all(isinstance(v, torch.Tensor) for v in saved.values()) and "conv1.weight" in saved
    model = build_model("resnet18", pretrained=str(out))
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    untrained = build_model("resnet18", pretrained=None)
    assert not torch.equal(untrained.backbone.conv1.weight, model.backbone.conv1.weight)
    # same settings: nothing is retrained; other settings: the stamp no longer matches
    assert sp.is_up_to_date(out, settings)
    mtime = out.stat().st_mtime_ns
    sp.pretrain(recipe, out, settings)
    assert out.stat().st_mtime_ns == mtime
    assert not sp.is_up_to_date(out, sp.settings_from(recipe, {**TINY, "iters": 2}))
    # seeded: the same settings give the same bytes, wherever the file is written
    again = sp.pretrain(recipe, tmp_path / "again" / "other-name.pth", settings)
    assert again.read_bytes() == out.read_bytes()
    # a damaged file is not "up to date" even with a matching stamp
    out.write_bytes(out.read_bytes()[:-1] + b"x")
    assert not sp.is_up_to_date(out, settings)
