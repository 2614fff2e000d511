"""`dmdl export` (ONNX / TorchScript with a parity check) and the `dmdl_cli.embed` API.

Runs on ``tiny_workspace`` (synthetic, 64x32, demo recipe: resnet18 without ImageNet weights),
copied before anything is written into it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import copy_workspace, discard_when_done, error_lines
from dmdl_cli.atomic import sha256_file
from dmdl_cli.data.cache import open_cache
from dmdl_cli.data.index import read_index
from dmdl_cli.errors import DmdlError
from dmdl_cli.features.extract import extract_features
from dmdl_cli.model.backbone import build_model
from dmdl_cli.model.loading import resolve_model
from dmdl_cli.recipe import load_recipe
from dmdl_cli.runtime import Runtime
from dmdl_cli.workspace import Workspace, save_checkpoint

ort = pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

HEIGHT, WIDTH = 64, 32
CPU = Runtime(torch.device("cpu"), None, False)


def _perturbed_resnet18(seed: int) -> torch.nn.Module:
    """A resnet18 whose BatchNorm statistics are not the trivial (0, 1) of a fresh init."""
    torch.manual_seed(seed)
    model = build_model("resnet18", pretrained=None)
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=gen))
            mod.running_var.copy_(1.0 + torch.rand(mod.running_var.shape, generator=gen))
            mod.weight.data.copy_(0.5 + 0.5 * torch.rand(mod.weight.shape, generator=gen))
    return model.eval()




@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory, request) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    model = _perturbed_resnet18(5)
    save_checkpoint(path, {"model": model.state_dict(),
                           "meta": {"arch": "resnet18", "input_size": [HEIGHT, WIDTH],
                                    "stage": "stage1", "epoch": 0}})
    yield path
    discard_when_done(request, path.parent)


def _cache(ws: Path):
    index = read_index(ws / "data" / "index.csv")
    return index, open_cache(ws / "data" / f"cache-{HEIGHT}x{WIDTH}.u8", len(index), HEIGHT, WIDTH)


def _preprocess(cache_rows: np.ndarray, spec: dict) -> np.ndarray:
    """What preprocess.json tells a deployment to do: (N, H, W, 3) uint8 -> (N, 3, H, W)."""
    x = cache_rows.astype(np.float32) * np.float32(spec["scale"])
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _flip_averaged(run, x: np.ndarray) -> np.ndarray:
    emb = run(x) + run(np.ascontiguousarray(x[..., ::-1]))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_export_both_formats_parity_on_cache_images(tiny_workspace, tmp_path, run_cli):
    ws = copy_workspace(tiny_workspace, tmp_path)
    result = run_cli(["export", "--workspace", ws, "--checkpoint", "imagenet"])
    assert result.exit_code == 0, result.output
    assert "max |diff|" in result.output and "min cosine" in result.output
    out = ws / "export"
    assert (out / "model.onnx").is_file() and (out / "model.ts").is_file()
    spec = json.loads((out / "preprocess.json").read_text())

    # what preprocess.json promises
    assert spec["input"]["shape"] == [1, 3, HEIGHT, WIDTH] and spec["input"]["layout"] == "NCHW"
    assert spec["input"]["normalization_in_graph"] is False
    assert spec["preprocess"]["channel_order"] == "RGB"
    assert spec["preprocess"]["value_range"] == [0, 255]
    assert spec["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec["preprocess"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert spec["flip_averaging"]["included"] is False and "mirror" in spec["flip_averaging"]["how"]
    assert spec["output"]["shape"] == [1, 512] and spec["output"]["l2_normalized"] is True
    assert spec["model"]["checkpoint"] == "random-init" and spec["model"]["arch"] == "resnet18"
    for name, file in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
        assert spec["files"][name]["sha256"] == sha256_file(out / file)
        assert spec["files"][name]["bytes"] == (out / file).stat().st_size
    assert spec["files"]["onnx"]["opset"] == 17
    checks = spec["parity"]["checks"]
    assert {c["format"] for c in checks} == {"onnx", "torchscript"}
    assert all(c["passed"] and c["max_abs_diff"] <= 1e-4 and c["min_cosine"] > 0.9999
               and c["images"] == 8 and c["batch"] == 1 for c in checks)

    # independent check: follow preprocess.json by hand on real cache images, flip-average as
    # it says, and compare with dmdl's own (PyTorch) evaluation features of the same rows
    wsobj = Workspace.open(ws)
    recipe = load_recipe(ws / "recipe.yaml")
    index, cache = _cache(ws)
    rows = index.rows(split="test")[::9][:6]
    model = resolve_model(wsobj, recipe, "imagenet").model
    want = extract_features(model, cache, rows, CPU, batch_size=4)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = _preprocess(np.asarray(cache[rows]), spec["preprocess"])
    run_onnx = lambda b: np.concatenate([session.run(None, {"images": b[i:i + 1]})[0]  # noqa: E731
                                         for i in range(len(b))])
    got = _flip_averaged(run_onnx, x)
    assert got.shape == (len(rows), 512)
    assert np.abs(got - want).max() < 1e-4
    ts = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        got_ts = _flip_averaged(lambda b: ts(torch.from_numpy(b)).numpy(), x)
    assert np.abs(got_ts - want).max() < 1e-5

    # the ledger records the export and its files
    run = Workspace.open(ws).runs("export")[-1]
    assert run["status"] == "done"
    assert {o["path"] for o in run["outputs"]} == {"export/model.onnx", "export/model.ts",
                                                   "export/preprocess.json"}


def test_dynamic_batch_onnx_runs_any_batch_and_drops_stale_file(tiny_workspace, tmp_path, run_cli):
    ws = copy_workspace(tiny_workspace, tmp_path)
    (ws / "export").mkdir()
    (ws / "export" / "model.ts").write_bytes(b"an earlier export")
    result = run_cli(["export", "-w", ws, "--checkpoint", "imagenet", "--format", "onnx",
                      "--dynamic-batch"])
    assert result.exit_code == 0, result.output
    spec = json.loads((ws / "export" / "preprocess.json").read_text())
    assert spec["input"]["shape"] == ["batch", 3, HEIGHT, WIDTH]
    assert sorted(c["batch"] for c in spec["parity"]["checks"]) == [1, 7, 8]
    assert all(c["passed"] for c in spec["parity"]["checks"])
    assert set(spec["files"]) == {"onnx"}
    assert not (ws / "export" / "model.ts").exists()  # not described by preprocess.json

    session = ort.InferenceSession(str(ws / "export" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    index, cache = _cache(ws)
    x = _preprocess(np.asarray(cache[:7]), spec["preprocess"])
    full = session.run(None, {"images": x})[0]
    assert full.shape == (7, 512)
    np.testing.assert_allclose(session.run(None, {"images": x[:1]})[0], full[:1], atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"images": x[2:5]})[0], full[2:5], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)


def test_opset_18_uses_the_torch_export_based_exporter(tiny_workspace, tmp_path, run_cli):
    ws = copy_workspace(tiny_workspace, tmp_path)
    result = run_cli(["export", "-w", ws, "--checkpoint", "imagenet", "--format", "onnx",
                      "--opset", "18"])
    assert result.exit_code == 0, result.output
    spec = json.loads((ws / "export" / "preprocess.json").read_text())
    assert spec["files"]["onnx"]["opset"] == 18 and "torch.export" in spec["files"]["onnx"]["exporter"]
    assert all(c["passed"] for c in spec["parity"]["checks"])
    import onnx

    graph = onnx.load(str(ws / "export" / "model.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 18
    ops = {node.op_type for node in graph.graph.node}
    assert {"Conv", "Pow", "ReduceMean"} <= ops


def test_saved_checkpoint_is_exported_by_default(tiny_workspace, tmp_path, run_cli, checkpoint_file):
    ws = copy_workspace(tiny_workspace, tmp_path)
    target = ws / "stage1" / "final.pt"
    save_checkpoint(target, torch.load(checkpoint_file, weights_only=False))
    result = run_cli(["export", "-w", ws])
    assert result.exit_code == 0, result.output
    spec = json.loads((ws / "export" / "preprocess.json").read_text())
    assert spec["model"]["checkpoint"] == "stage1-final"
    assert spec["model"]["checkpoint_sha256"] == sha256_file(target)
    assert spec["model"]["stage"] == "stage1" and spec["model"]["epoch"] == 1  # meta epoch 0, shown from 1
    assert spec["recipe_hash"] == load_recipe(ws / "recipe.yaml").hash()
    assert all(c["passed"] for c in spec["parity"]["checks"]) and len(spec["parity"]["checks"]) == 2

    # the exported graph computes the trained network, not the recipe's initialisation
    index, cache = _cache(ws)
    x = _preprocess(np.asarray(cache[:1]), spec["preprocess"])
    ts = torch.jit.load(str(ws / "export" / "model.ts"))
    with torch.no_grad():
        want = _perturbed_resnet18(5)(torch.from_numpy(x)).numpy()
        got = ts(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert Workspace.open(ws).runs("export")[-1]["inputs"][0]["path"] == "stage1/final.pt"


def test_missing_checkpoint_is_one_error_line(tiny_workspace, tmp_path, run_cli):
    ws = copy_workspace(tiny_workspace, tmp_path)
    missing = tmp_path / "nowhere" / "final.pt"
    result = run_cli(["export", "-w", ws, "--checkpoint", missing])
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1 and str(missing) in result.output.replace("\n", "")
    assert not (ws / "export" / "model.onnx").exists()


def test_missing_export_extra_names_it_and_torchscript_still_works(
        tiny_workspace, tmp_path, run_cli, monkeypatch):
    ws = copy_workspace(tiny_workspace, tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises
    result = run_cli(["export", "-w", ws, "--checkpoint", "imagenet"])
    assert result.exit_code != 0
    assert len(error_lines(result)) == 1
    assert "dmdl[export]" in result.output and "make venv" in result.output
    assert not (ws / "export").exists() or not any((ws / "export").iterdir())

    result = run_cli(["export", "-w", ws, "--checkpoint", "imagenet", "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert (ws / "export" / "model.ts").is_file() and not (ws / "export" / "model.onnx").exists()


def test_failed_parity_writes_nothing(tiny_workspace, tmp_path, run_cli, monkeypatch):
    import dmdl_cli.export as export

    ws = copy_workspace(tiny_workspace, tmp_path)
    (ws / "export").mkdir()
    (ws / "export" / "model.ts").write_bytes(b"previous good export")
    original = export.exportable_model

    def broken(model):
        net = original(model)
        with torch.no_grad():
            net.neck.running_mean.add_(0.05)  # a small, real deviation of the graph
        return net

    monkeypatch.setattr(export, "exportable_model", broken)
    result = run_cli(["export", "-w", ws, "--checkpoint", "imagenet", "--format", "torchscript"])
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "parity" in lines[0] and "FAIL" in result.output
    assert (ws / "export" / "model.ts").read_bytes() == b"previous good export"
    assert not (ws / "export" / "preprocess.json").exists()
    assert sorted(p.name for p in (ws / "export").iterdir()) == ["model.ts"]  # no temp files
    assert Workspace.open(ws).runs("export")[-1]["status"] == "failed"


def test_bad_format_and_opset(tiny_workspace, tmp_path, run_cli):
    ws = copy_workspace(tiny_workspace, tmp_path)
    result = run_cli(["export", "-w", ws, "--checkpoint", "imagenet", "--format", "tflite"])
    assert result.exit_code == 2 and "'tflite' is not one of onnx, torchscript" in result.output
    result = run_cli(["export", "-w", ws, "--checkpoint", "imagenet", "--opset", "3"])
    assert result.exit_code != 0 and len(error_lines(result)) == 1 and "--opset" in result.output


# --------------------------------------------------------------------------------------------
# dmdl_cli.embed
# --------------------------------------------------------------------------------------------
def test_embed_matches_evaluation_features(tiny_workspace, checkpoint_file):
    import dmdl_cli

    index, cache = _cache(tiny_workspace)
    rows = np.array([0, 5, 100, len(index) - 1])
    paths = [index.paths[i] for i in rows]
    # the checkpoint carries no recipe (an older dmdl's): the workspace's recipe says how its
    # images were resized (bicubic), as for evaluation
    recipe = tiny_workspace / "recipe.yaml"
    feats = dmdl_cli.embed(paths, checkpoint_file, recipe=recipe, batch_size=3, device="cpu")
    assert feats.shape == (4, 512) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)

    model = build_model("resnet18", pretrained=None)
    model.load_state_dict(torch.load(checkpoint_file, weights_only=False)["model"])
    want = extract_features(model, cache, rows, CPU, batch_size=2)  # flip-averaged
    assert np.abs(feats - want).max() < 1e-5

    # PIL images (any size, grey or RGB) give the same result as their files
    pil = [Image.open(p) for p in paths]
    np.testing.assert_allclose(dmdl_cli.embed(pil, checkpoint_file, recipe=recipe, device="cpu"), feats,
                               atol=1e-6)
    single = dmdl_cli.embed(paths[1], checkpoint_file, recipe=recipe, device="cpu")
    np.testing.assert_allclose(single, feats[1:2], atol=1e-5)
    no_flip = dmdl_cli.embed(paths, checkpoint_file, recipe=recipe, flip=False, device="cpu")
    np.testing.assert_allclose(no_flip, extract_features(model, cache, rows, CPU, flip=False),
                               atol=1e-5)
    assert np.abs(no_flip - feats).max() > 1e-4  # flip averaging does something
    assert dmdl_cli.embed([], checkpoint_file, device="cpu").shape == (0, 512)


def test_embed_errors(tmp_path, checkpoint_file, tiny_workspace):
    from dmdl_cli.inference import embed

    with pytest.raises(DmdlError, match="does not exist"):
        embed([tmp_path / "x.jpg"], tmp_path / "missing.pt")
    with pytest.raises(DmdlError, match="x.jpg"):
        embed([tmp_path / "x.jpg"], checkpoint_file, device="cpu")
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {"model": torch.load(checkpoint_file, weights_only=False)["model"],
                          "meta": {"arch": "resnet50", "input_size": [HEIGHT, WIDTH]}})
    with pytest.raises(DmdlError, match="does not fit the resnet50"):
        embed([tmp_path / "x.jpg"], bad, device="cpu")
