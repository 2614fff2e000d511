"""`dmdl evaluate` and `dmdl cluster` end to end on the tiny synthetic workspace (CPU, 64x32).

The tiny workspace uses the demo recipe (resnet18, no ImageNet weights), so `--checkpoint
imagenet` is the seeded random initialisation, named `random-init` in output files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_refused, copy_workspace, error_lines, invoke, tree_snapshot
from dmdl_cli.atomic import sha256_file
from dmdl_cli.clustering.pseudo_labels import cluster_features
from dmdl_cli.data.cache import open_cache
from dmdl_cli.data.index import INFRARED, VISIBLE, read_index
from dmdl_cli.features.extract import extract_features
from dmdl_cli.evaluation.metrics import rank_metrics
from dmdl_cli.evaluation.protocols import build_trials
from dmdl_cli.model.loading import initial_model, resolve_model, state_sha256
from dmdl_cli.recipe import load_recipe
from dmdl_cli.runtime import Runtime
from dmdl_cli.workspace import Workspace, load_labels, save_checkpoint

EVAL_ARGS = ["--mode", "all-search", "--checkpoint", "imagenet", "--trials", "2"]
CPU = Runtime(torch.device("cpu"), None, False)


@pytest.fixture(scope="module")
def evaluated(tiny_workspace, tmp_path_factory):
    """A copy of the tiny workspace after one `evaluate ... --visualize 2` (and its output)."""
    ws = copy_workspace(tiny_workspace, tmp_path_factory.mktemp("evaluated"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMDL_NO_PROGRESS", "1")
        result = invoke(["evaluate", "--workspace", ws, *EVAL_ARGS, "--visualize", "2"])
    assert result.exit_code == 0, result.output
    return ws, result.output


@pytest.fixture(scope="module")
def clustered(tiny_workspace, tmp_path_factory):
    ws = copy_workspace(tiny_workspace, tmp_path_factory.mktemp("clustered"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMDL_NO_PROGRESS", "1")
        result = invoke(["cluster", "--workspace", ws, "--checkpoint", "imagenet"])
    assert result.exit_code == 0, result.output
    return ws, result.output


def _recipe(ws: Path):
    return load_recipe(ws / "recipe.yaml")


def _features(ws: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = sorted((ws / "features").glob(f"*-{split}-64x32.npz"))
    assert len(files) == 1, files
    with np.load(files[0]) as data:
        return data["features"], data["rows"]


def _result_row(output: str, name: str) -> list[str]:
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no table row {name!r} in\n{output}")


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------

def test_evaluate_writes_the_report_with_per_trial_values(evaluated):
    ws, output = evaluated
    recipe = _recipe(ws)
    report = json.loads((ws / "eval" / "all-search-random-init.json").read_text())
    assert report["dataset"] == "synthetic"
    assert report["protocol"] == {"mode": "all-search", "trials": 2, "shots": 1, "rerank": False}
    assert report["checkpoint"]["name"] == "random-init"
    assert report["checkpoint"]["sha256"] == state_sha256(initial_model(recipe))
    assert report["recipe_hash"] == recipe.hash()
    trials = report["per_trial"]
    assert [t["seed"] for t in trials] == [0, 1]
    for t in trials:
        cmc = np.asarray(t["cmc"])
        assert cmc.shape == (20,) and np.all(np.diff(cmc) >= 0) and 0 <= cmc[0] <= cmc[-1] <= 1
        assert 0 < t["mINP"] <= t["mAP"] <= 1
    mean = report["mean"]
    assert mean["trials"] == 2
    assert mean["mAP"] == pytest.approx(np.mean([t["mAP"] for t in trials]))
    assert mean["cmc"] == pytest.approx(np.mean([t["cmc"] for t in trials], axis=0).tolist())

    # the printed table shows the same numbers
    row = _result_row(output, "all-search")
    assert row[1] == f"{100 * mean['cmc'][0]:.2f} ± {100 * mean['cmc_std'][0]:.2f}"
    assert row[5] == f"{100 * mean['mAP']:.2f} ± {100 * mean['mAP_std']:.2f}"
    assert row[6] == f"{100 * mean['mINP']:.2f} ± {100 * mean['mINP_std']:.2f}"
    assert row[7] == "2"
    assert "Rank-1" in output and "mINP" in output


def test_evaluate_metrics_are_the_protocol_on_the_cached_features(evaluated):
    ws, _ = evaluated
    recipe = _recipe(ws)
    index = read_index(ws / "data" / "index.csv")
    test_rows = index.rows(split="test")
    feats, rows = _features(ws, "test")
    assert np.array_equal(rows, test_rows)
    assert feats.dtype == np.float32 and feats.shape == (len(test_rows), 512)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # the cached features are the network's flip-averaged embeddings of the cached images
    # (checked on a spread of rows: eval-mode rows are independent of their batch)
    cache = open_cache(ws / "data" / "cache-64x32.u8", len(index), 64, 32)
    some = np.linspace(0, len(test_rows) - 1, 6).astype(int)
    again = extract_features(initial_model(recipe), cache, test_rows[some], CPU, batch_size=6)
    assert np.allclose(again, feats[some], atol=1e-4)
    # and the report is the protocol applied to them
    test = index.select(test_rows)
    report = json.loads((ws / "eval" / "all-search-random-init.json").read_text())
    trials = build_trials("synthetic", "all-search", pids=test.pids, cams=test.cams,
                          modality=test.modality, trials=2, shots=1)
    for trial, stored in zip(trials, report["per_trial"]):
        got = rank_metrics(2.0 - 2.0 * feats[trial.query] @ feats[trial.gallery].T,
                           test.pids[trial.query], test.pids[trial.gallery],
                           test.cams[trial.query], test.cams[trial.gallery],
                           exclude=trial.exclude, dedup=trial.dedup)
        assert got["mAP"] == pytest.approx(stored["mAP"], abs=1e-6)
        assert got["mINP"] == pytest.approx(stored["mINP"], abs=1e-6)
        assert np.allclose(got["cmc"], stored["cmc"], atol=1e-6)


def test_visualize_writes_ranked_list_pictures(evaluated):
    ws, output = evaluated
    pictures = sorted((ws / "eval" / "ranks").glob("*.png"))
    assert len(pictures) == 2
    assert all(p.name.startswith("all-search-random-init-q") for p in pictures)
    for path in pictures:
        with Image.open(path) as img:
            assert img.format == "PNG"
            # query + top-10 gallery: 64x32 crops upscaled to 128 px high, framed, captioned
            assert img.height > 128 + 2 * 6 and img.width > 11 * 64
    assert f"wrote 2 ranked lists (first trial) to {ws.resolve() / 'eval' / 'ranks'}" in output


def test_second_evaluation_reads_cached_features(evaluated):
    ws, _ = evaluated
    report = ws / "eval" / "all-search-random-init.json"
    first = json.loads(report.read_text())
    features = {p.name: sha256_file(p) for p in (ws / "features").iterdir()}
    result = invoke(["evaluate", "--workspace", ws, *EVAL_ARGS])
    assert result.exit_code == 0, result.output
    assert "read cached features" in result.output
    assert "wrote features" not in result.output
    assert {p.name: sha256_file(p) for p in (ws / "features").iterdir()} == features
    assert json.loads(report.read_text())["per_trial"] == first["per_trial"]


def test_a_checkpoint_file_is_loaded_with_its_name_and_sha256(evaluated, tmp_path):
    ws, _ = evaluated
    recipe = _recipe(ws)
    model = initial_model(recipe)
    path = tmp_path / "mine.pt"
    save_checkpoint(path, {"model": model.state_dict(),
                           "meta": {"arch": "resnet18", "input_size": [64, 32], "stage": "test"}})
    loaded = resolve_model(Workspace.open(ws), recipe, str(path))
    assert loaded.name == "mine" and loaded.sha256 == sha256_file(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_evaluate_bad_inputs_are_one_line_and_change_nothing(evaluated, tmp_path):
    ws, _ = evaluated
    recipe = _recipe(ws)
    state = initial_model(recipe).state_dict()
    other_arch = tmp_path / "r50.pt"
    save_checkpoint(other_arch, {"model": state, "meta": {"arch": "resnet50"}})
    r18 = tmp_path / "r18.pt"
    save_checkpoint(r18, {"model": state, "meta": {"arch": "resnet18"}})
    other_size = tmp_path / "big.pt"
    save_checkpoint(other_size, {"model": state, "meta": {"arch": "resnet18",
                                                          "input_size": [288, 144]}})
    made = recipe.to_dict()
    made["model"]["gem_p"] = 4.0
    other_gem = tmp_path / "gem4.pt"  # the network comes from the recipe the checkpoint carries
    save_checkpoint(other_gem, {"model": state, "meta": {"arch": "resnet18", "input_size": [64, 32],
                                                         "recipe": made}})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    missing = tmp_path / "missing.pt"
    root = Path(__file__).resolve().parent.parent

    cases = [
        (["--mode", "visible-to-infrared"], ["'visible-to-infrared'", "synthetic",
                                            "all-search, indoor-search"]),
        (["--mode", "all-search", "--checkpoint", missing], [str(missing), "does not exist"]),
        (["--mode", "all-search", "--checkpoint", junk], [str(junk), "cannot be read"]),
        (["--mode", "all-search", "--checkpoint", other_arch], [str(other_arch), "resnet50",
                                                               "resnet18"]),
        (["--mode", "all-search", "--checkpoint", r18, "--set", "model.arch=resnet50"],
         [str(r18), "holds a resnet18 backbone", "asks for resnet50"]),
        (["--mode", "all-search", "--checkpoint", other_size], ["288x144", "64x32"]),
        (["--mode", "all-search", "--checkpoint", other_gem],
         [str(other_gem), "model.gem_p 4.0", "asks for 3.0", "--set model.gem_p=4.0"]),
        (["--mode", "all-search", "--trials", "0"], ["--trials 0"]),
        (["--mode", "all-search", "--shots", "3"], ["--shots 3", "1", "10"]),
        (["--mode", "all-search", "--visualize", "-1"], ["--visualize -1"]),
        (["--mode", "all-search", "--set", "data.height=32"], ["cache-32x32.u8", "prepare-data"]),
        (["--mode", "all-search", "--recipe", root / "recipes" / "sysu.yaml"],
         ["'sysu'", "'synthetic'"]),
        (["--mode", "all-search", "--set", "eval.trials=0"], ["eval.trials"]),
    ]
    before = tree_snapshot(ws)
    for extra, words in cases:
        result = invoke(["evaluate", "--workspace", ws, *extra])
        assert_refused(result, *words)
        assert tree_snapshot(ws) == before, extra
    result = invoke(["evaluate", "--workspace", tmp_path / "nowhere"])
    line = assert_refused(result, "does not exist", "prepare-data")
    assert result.output.strip() == line


# --------------------------------------------------------------------------------------------
# cluster
# --------------------------------------------------------------------------------------------

def test_cluster_writes_labels_aligned_with_the_index(clustered):
    ws, output = clustered
    recipe = _recipe(ws)
    index = read_index(ws / "data" / "index.csv")
    labels, meta, _ = load_labels(ws / "labels" / "cluster-random-init.npz")
    with np.load(ws / "labels" / "cluster-random-init.npz") as raw:
        assert np.issubdtype(raw["labels"].dtype, np.integer)
    assert labels.shape == (len(index),)
    assert np.all(labels[index.rows(split="test")] == -1)
    train = index.rows(split="train")
    assert labels[train].min() >= -1 and (labels[train] >= 0).any()
    assert meta["checkpoint"] == "random-init" and meta["recipe_hash"] == recipe.hash()
    assert meta["checkpoint_sha256"] == state_sha256(initial_model(recipe))
    assert meta["modality"] == "both"

    # the labels are DBSCAN on the Jaccard distance of the cached train features, per modality,
    # visible clusters first, infrared clusters numbered after them (no cluster spans both)
    feats, rows = _features(ws, "train")
    assert np.array_equal(rows, train)
    offset = 0
    for m in (VISIBLE, INFRARED):
        sel = index.modality[train] == m
        want = cluster_features(feats[sel], k1=recipe.cluster.k1, k2=recipe.cluster.k2,
                                eps=recipe.cluster.eps, min_samples=recipe.cluster.min_samples)
        got = labels[train[sel]]
        assert np.array_equal(got, np.where(want >= 0, want + offset, -1))
        offset += int(want.max()) + 1 if (want >= 0).any() else 0
    vis = set(labels[train[index.modality[train] == VISIBLE]]) - {-1}
    ir = set(labels[train[index.modality[train] == INFRARED]]) - {-1}
    assert not vis & ir

    # the table: one row per modality with the image counts, ARI/NMI/purity as diagnostics
    assert "ARI*" in output and "NMI*" in output and "purity*" in output
    assert "* diagnostics against the data set's identities; training never reads them" in output
    for m, name in ((VISIBLE, "visible"), (INFRARED, "infrared")):
        row = _result_row(output, name)
        n = int((index.modality[train] == m).sum())
        sub = labels[train[index.modality[train] == m]]
        assert row[1] == str(n)
        assert row[2] == str(len(set(sub) - {-1}))
        assert row[3] == str(int((sub == -1).sum()))
        assert len(row) == 10 and all(re.fullmatch(r"-?\d+\.\d{3}", c) for c in row[7:])
    assert f"wrote {ws.resolve() / 'labels' / 'cluster-random-init.npz'}" in output


def test_cluster_one_modality_reuses_features(clustered, tmp_path):
    src, _ = clustered
    ws = copy_workspace(src, tmp_path)
    both, _, _ = load_labels(ws / "labels" / "cluster-random-init.npz")
    result = invoke(["cluster", "--workspace", ws, "--checkpoint", "imagenet",
                     "--modality", "infrared"])
    assert result.exit_code == 0, result.output
    assert "read cached features" in result.output
    only, meta, _ = load_labels(ws / "labels" / "cluster-random-init.npz")
    index = read_index(ws / "data" / "index.csv")
    ir = index.rows(split="train", modality=INFRARED)
    assert np.all(np.delete(only, ir) == -1) and meta["modality"] == "infrared"
    # the same clusters as in the two-modality run, numbered from 0
    shift = both[ir][both[ir] >= 0].min() if (both[ir] >= 0).any() else 0
    assert np.array_equal(only[ir], np.where(both[ir] >= 0, both[ir] - shift, -1))
    assert "visible" not in [_row[0] for _row in _rows(result.output)]


def _rows(output: str) -> list[list[str]]:
    out = []
    for line in output.splitlines():
        if line.strip().startswith("│"):
            out.append([c.strip() for c in line.strip().strip("│").split("│")])
    return out


def test_cluster_bad_inputs_are_one_line_and_change_nothing(clustered, tmp_path):
    ws, _ = clustered
    before = tree_snapshot(ws)
    missing = tmp_path / "missing.pt"
    for extra, words in [
        (["--checkpoint", missing], [str(missing), "does not exist"]),
        (["--set", "cluster.eps=2"], ["cluster.eps", "open interval"]),
        (["--set", "cluster.k1=0"], ["cluster.k1", "minimum"]),
    ]:
        assert_refused(invoke(["cluster", "--workspace", ws, *extra]), *words)
        assert tree_snapshot(ws) == before, extra


def test_an_index_changed_behind_the_manifest_is_refused(tiny_workspace, tmp_path):
    ws = copy_workspace(tiny_workspace, tmp_path)
    index = ws / "data" / "index.csv"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]) + "\n")  # a half-written or hand-edited index
    before = tree_snapshot(ws)
    result = invoke(["evaluate", "--workspace", str(ws), "--checkpoint", "imagenet"])
    assert result.exit_code != 0
    (line,) = error_lines(result)
    assert "index.csv does not match the manifest" in line and "--force" in line
    assert tree_snapshot(ws) == before
