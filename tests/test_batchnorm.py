"""BatchNorm re-estimation on clean images (dmdl_cli.features.batchnorm)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmdl_cli.model.backbone import build_model, normalize_batch
from dmdl_cli.features.batchnorm import batchnorm_layers, recalibrate_batchnorm, recalibration_rows
from dmdl_cli.recipe import load_recipe
from dmdl_cli.runtime import select_runtime

REPO = Path(__file__).resolve().parents[1]


def _cpu_runtime():
    return select_runtime(load_recipe(REPO / "recipes" / "demo.yaml"), deterministic=True)


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 16, 3), dtype=np.uint8)  # (N, H, W, 3) like the cache


def test_rows_are_a_seeded_subset_in_a_fixed_order() -> None:
    rows = np.arange(100, 200)
    a = recalibration_rows(rows, 30, seed=1, epoch=2)
    assert len(a) == 30 and len(set(a.tolist())) == 30 and set(a.tolist()) <= set(rows.tolist())
    assert np.array_equal(a, recalibration_rows(rows, 30, seed=1, epoch=2))
    assert not np.array_equal(a, recalibration_rows(rows, 30, seed=1, epoch=3))
    assert sorted(recalibration_rows(rows, 500, seed=1, epoch=0).tolist()) == rows.tolist()


def test_one_batch_sets_the_first_layer_to_that_batch_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", pretrained=None, gem_p=3.0, last_stride=1).eval()
    cache = _images(12)
    rows = np.arange(12)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
              and "num_batches" not in k}
    layers = batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    count = recalibrate_batchnorm(model, cache, rows, _cpu_runtime(), batch_size=12)
    assert count == len(layers) > 0
    # the first BatchNorm sees conv1 of the 12 images: its running stats are their statistics
    x = normalize_batch(torch.from_numpy(cache).permute(0, 3, 1, 2))
    with torch.no_grad():
        y = model.backbone.conv1(x)  # (12, 64, 16, 8)
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), unbiased=True)
    first = model.backbone.bn1
    torch.testing.assert_close(first.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, var, rtol=1e-4, atol=1e-5)
    # weights, mode and momentum untouched
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not model.training
    assert [layer.momentum for layer in layers] == momenta


def test_several_batches_average_and_make_eval_match_train_mode() -> None:
    torch.manual_seed(1)
    model = build_model("resnet18", pretrained=None, gem_p=3.0, last_stride=1)
    cache = _images(64, seed=3)
    x = normalize_batch(torch.from_numpy(cache).permute(0, 3, 1, 2))

    def cosine_train_vs_eval() -> float:
        with torch.no_grad():
            state = {k: v.clone() for k, v in model.state_dict().items()}
            model.train()
            train_emb = torch.nn.functional.normalize(model(x)[1], dim=1)  # (64, D)
            model.load_state_dict(state)  # the train-mode pass moved the running statistics
            model.eval()
            eval_emb = model(x)
        return float((train_emb * eval_emb).sum(1).mean())

    before = cosine_train_vs_eval()
    recalibrate_batchnorm(model, cache, np.arange(64), _cpu_runtime(), batch_size=64)
    after = cosine_train_vs_eval()
    # running statistics from the same 64 images: eval mode reproduces the batch's train mode
    assert after > 0.999 > before
