"""`dmdl prepare-data` through the CLI: every layout, the workspace it writes, and bad inputs.

A bad input must give one `error:` line naming the file and the fix, a non-zero exit, no
traceback, and leave the workspace exactly as it was (file names + sha256 compared).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_SIZE, assert_refused, copy_workspace, error_lines, invoke, tree_snapshot
from dmdl_cli import __version__
from dmdl_cli.atomic import sha256_file
from dmdl_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("prepare-data", "pretrain-single", "cluster", "train-cross", "evaluate", "export", "select",
            "report")
SYSU_MODALITY = {1: "visible", 2: "visible", 3: "infrared", 4: "visible", 5: "visible", 6: "infrared"}
HEIGHT, WIDTH = 64, 32


# --------------------------------------------------------------------------------------------
# helpers: what the raw tree says, independently of dmdl's readers
# --------------------------------------------------------------------------------------------

def expected_sysu(root: Path) -> list[tuple[str, int, int, str, str]]:
    """(path, pid, cam, modality, split) of every image of a SYSU-layout tree."""
    ids = {}
    for name in ("train", "val", "test"):
        text = (root / "exp" / f"{name}_id.txt").read_text()
        ids[name] = {int(t) for t in re.split(r"[,\s]+", text) if t}
    rows = []
    for cam in range(1, 7):
        for person in sorted((root / f"cam{cam}").iterdir()):
            pid = int(person.name)
            split = "test" if pid in ids["test"] else "train"
            assert pid in ids["test"] | ids["train"] | ids["val"]
            for image in sorted(person.glob("*.jpg")):
                rows.append((str(image), pid, cam, SYSU_MODALITY[cam], split))
    return rows


def expected_lists(root: Path, files: dict[tuple[str, str], str], cam_of) -> list[tuple]:
    rows = []
    for (split, modality), name in files.items():
        for line in (root / "idx" / name).read_text().splitlines():
            if line.strip():
                rel, label = line.rsplit(None, 1)
                rows.append((str(root / rel), int(label), cam_of(rel, modality), modality, split))
    return rows


def expected_regdb(root: Path, trial: int) -> list[tuple]:
    files = {(s, m): f"{s}_{'visible' if m == 'visible' else 'thermal'}_{trial}.txt"
             for s in ("train", "test") for m in ("visible", "infrared")}
    return expected_lists(root, files, lambda rel, m: 1 if m == "visible" else 2)


def expected_llcm(root: Path) -> list[tuple]:
    files = {(s, m): f"{s}_{'vis' if m == 'visible' else 'nir'}.txt"
             for s in ("train", "test") for m in ("visible", "infrared")}
    return expected_lists(root, files, lambda rel, m: int(re.search(r"/cam(\d+)/", rel).group(1)))


def read_index_csv(ws: Path) -> tuple[str, list[tuple[str, int, int, str, str]]]:
    text = (ws / "data" / "index.csv").read_text()
    header, _ = text.split("\n", 1)
    reader = csv.reader(text.splitlines()[1:])
    return header, [(p, int(pid), int(cam), mod, split) for p, pid, cam, mod, split in reader]


def table_rows(output: str) -> list[list[str]]:
    """Body rows of the rich table printed by prepare-data: [split, modality, camera, images, ids]."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 5 and cells[0] in ("train", "test"):
            rows.append(cells)
    return rows


def check_table(output: str, rows: list[tuple]) -> None:
    want = []
    for split in ("train", "test"):
        for modality in ("visible", "infrared"):
            sel = [r for r in rows if r[3] == modality and r[4] == split]
            if not sel:
                continue
            for cam in sorted({r[2] for r in sel}):
                at = [r for r in sel if r[2] == cam]
                want.append([split, modality, str(cam), str(len(at)), str(len({r[1] for r in at}))])
            want.append([split, modality, "all", str(len(sel)), str(len({r[1] for r in sel}))])
    assert table_rows(output) == want


def check_workspace(ws: Path, rows: list[tuple], dataset: str, recipe_file: str,
                    overrides: list[str], prepare_runs: int = 1) -> None:
    """index.csv, cache, recipe.yaml and manifest.json of a freshly prepared workspace."""
    header, got = read_index_csv(ws)
    assert header == "path,pid,cam,modality,split"
    assert all(Path(p).is_absolute() for p, *_ in got)
    # same images with the same labels; counts per split x modality x camera agree
    assert sorted(got) == sorted(rows)
    assert Counter((r[4], r[3], r[2]) for r in got) == Counter((r[4], r[3], r[2]) for r in rows)
    # rows are ordered train first, then test
    splits = [r[4] for r in got]
    assert splits == sorted(splits, key=("train", "test").index)

    # the cache: row i is image i decoded and resized as data/cache.py does it, with the
    # recipe's filter (recipes/sysu.yaml: bicubic, as the reference)
    cache_file = ws / "data" / f"cache-{HEIGHT}x{WIDTH}.u8"
    assert cache_file.stat().st_size == len(got) * HEIGHT * WIDTH * 3
    cache = np.memmap(cache_file, dtype=np.uint8, mode="r", shape=(len(got), HEIGHT, WIDTH, 3))
    for i, (path, *_rest) in enumerate(got):
        with Image.open(path) as img:
            want = np.asarray(img.convert("RGB").resize((WIDTH, HEIGHT), Image.BICUBIC))
        assert np.array_equal(cache[i], want), path
    del cache

    # the resolved recipe
    recipe = load_recipe(ws / "recipe.yaml")
    assert recipe == load_recipe(REPO / "recipes" / recipe_file, overrides=overrides)
    assert (recipe.data.dataset, recipe.data.height, recipe.data.width) == (dataset, HEIGHT, WIDTH)

    # the ledger
    manifest = json.loads((ws / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["dmdl_version"] == __version__
    ds = manifest["dataset"]
    assert ds["name"] == dataset and ds["num_images"] == len(got)
    assert re.fullmatch(r"[0-9a-f]{64}", ds["fingerprint"])
    assert ds["index_sha256"] == sha256_file(ws / "data" / "index.csv")
    runs = [r for r in manifest["runs"] if r["stage"] == "prepare-data"]
    assert len(runs) == prepare_runs
    run = runs[-1]
    assert run["status"] == "done" and run["recipe_hash"] == recipe.hash()
    assert run["dmdl_version"] == __version__
    assert run["started"] and run["ended"] and run["started"] <= run["ended"]
    outputs = {o["path"]: o for o in run["outputs"]}
    assert set(outputs) == {"data/index.csv", f"data/cache-{HEIGHT}x{WIDTH}.u8"}
    for rel, record in outputs.items():
        assert record["sha256"] == sha256_file(ws / rel)
        assert record["bytes"] == (ws / rel).stat().st_size


def prepare(dataset: str, root: Path | None, ws: Path, *extra: str):
    args = ["prepare-data", "--dataset", dataset, "--workspace", ws, *TINY_SIZE, *extra]
    if root is not None:
        args[3:3] = ["--root", root]
    return invoke(args)




def copy_tree(src: Path, tmp_path: Path, name: str = "raw") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# the command line itself
# --------------------------------------------------------------------------------------------

def test_help_lists_the_stage_commands_the_report_and_version():
    result = invoke(["--help"])
    assert result.exit_code == 0
    listed = re.findall(r"^\s{2}([a-z-]+)\s", result.output.split("Commands:")[1], re.M)
    assert sorted(listed) == sorted(COMMANDS)
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dmdl {__version__}"
    for command in COMMANDS:
        result = invoke([command, "--help"])
        # the six stages take one workspace; report takes several as arguments
        wanted = "workspaces" if command == "report" else "--workspace"
        assert result.exit_code == 0 and wanted in result.output.lower(), (command, result.output)


def test_console_script_and_module_run_without_tracebacks(tmp_path):
    script = Path(sys.executable).parent / "dmdl"
    assert script.is_file(), "the dmdl console script is not installed in this environment"
    env = dict(os.environ, DMDL_NO_PROGRESS="1")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)
    out = subprocess.run([sys.executable, "-m", "dmdl_cli", "--version"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"dmdl {__version__}"
    # a user error: one line, exit 1, no traceback, nothing created
    ws = tmp_path / "ws"
    out = subprocess.run([str(script), "prepare-data", "--dataset", "sysu", "--root",
                          str(tmp_path / "no-such-root"), "--workspace", str(ws)],
                         capture_output=True, text=True, env=env, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1
    assert "Traceback" not in text
    assert text.strip().splitlines() == [text.strip()]
    assert text.startswith("error: ") and "no-such-root" in text and "does not exist" in text
    assert not ws.exists()


# --------------------------------------------------------------------------------------------
# every layout
# --------------------------------------------------------------------------------------------

def test_prepare_sysu_layout(tmp_path, synthetic_root):
    ws = tmp_path / "ws"
    result = prepare("sysu", synthetic_root, ws)
    assert result.exit_code == 0, result.output
    rows = expected_sysu(synthetic_root)
    assert len(rows) == 6 * 6 * 2  # 6 identities x 6 cameras x 2 images
    check_workspace(ws, rows, "sysu", "sysu.yaml",
                    ["data.dataset=sysu", "data.trial=1", *TINY_SIZE[1::2]])
    check_table(result.output, rows)
    assert f"read {len(rows)} images of sysu" in result.output
    assert "0 unreadable" in result.output
    assert not list((ws / "data").glob(".*.tmp"))  # no temp file left


def test_prepare_warns_at_once_when_the_recipes_imagenet_file_is_missing(tmp_path, synthetic_root,
                                                                          monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("DMDL_WEIGHTS_DIR", raising=False)
    result = prepare("sysu", synthetic_root, tmp_path / "ws")  # recipes/sysu.yaml: imagenet
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    expected = tmp_path / "th" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert len(warnings) == 1 and f"at {expected} " in warnings[0], result.output
    assert "stage 1 will stop" in warnings[0]
    # with the file in place (or no ImageNet weights asked for) nothing is said
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"")
    again = prepare("sysu", synthetic_root, tmp_path / "ws2")
    none = prepare("sysu", synthetic_root, tmp_path / "ws3", "--set", "model.pretrained=null")
    for result in (again, none):
        assert result.exit_code == 0 and "warning:" not in result.output, result.output


def test_prepare_regdb_layout_with_trial(tmp_path, regdb_root):
    ws = tmp_path / "ws"
    result = prepare("regdb", regdb_root, ws, "--trial", "2")
    assert result.exit_code == 0, result.output
    rows = expected_regdb(regdb_root, 2)
    assert rows != expected_regdb(regdb_root, 1)  # the trial matters
    check_workspace(ws, rows, "regdb", "regdb.yaml",
                    ["data.dataset=regdb", "data.trial=2", *TINY_SIZE[1::2]])
    check_table(result.output, rows)
    manifest = json.loads((ws / "manifest.json").read_text())
    assert manifest["dataset"]["trial"] == 2
    assert load_recipe(ws / "recipe.yaml").data.trial == 2
    # another trial is another data set for this workspace
    before = tree_snapshot(ws)
    result = prepare("regdb", regdb_root, ws, "--trial", "3")
    assert_refused(result, "prepared from regdb", "trial 2", "--force")
    assert tree_snapshot(ws) == before


def test_prepare_llcm_layout(tmp_path, llcm_root):
    ws = tmp_path / "ws"
    result = prepare("llcm", llcm_root, ws)
    assert result.exit_code == 0, result.output
    rows = expected_llcm(llcm_root)
    assert {r[2] for r in rows if r[3] == "infrared"} == {1, 2, 4}
    check_workspace(ws, rows, "llcm", "llcm.yaml",
                    ["data.dataset=llcm", "data.trial=1", *TINY_SIZE[1::2]])
    check_table(result.output, rows)


def test_prepare_synthetic_demo_path(tiny_workspace, tmp_path):
    manifest = json.loads((tiny_workspace / "manifest.json").read_text())
    root = Path(manifest["dataset"]["root"])
    rows = expected_sysu(root)
    assert len(rows) == 9 * 6 * 5
    # --ids / --seed are recorded in the recipe as synthetic.ids / synthetic.seed
    check_workspace(tiny_workspace, rows, "synthetic", "demo.yaml",
                    ["data.dataset=synthetic", "data.trial=1", "synthetic.ids=9", "synthetic.seed=0",
                     *TINY_SIZE[1::2]])
    # re-running the same request reuses the generated set and changes nothing
    ws = copy_workspace(tiny_workspace, tmp_path)
    before, raw_before = tree_snapshot(ws), tree_snapshot(root)
    args = ["prepare-data", "--dataset", "synthetic", "--ids", "9", "--seed", "0", "--root", root,
            "--workspace", ws]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "unchanged" in result.output and "generated" not in result.output
    assert tree_snapshot(ws) == before and tree_snapshot(root) == raw_before
    # another --seed for the same synthetic folder is refused, naming it
    result = invoke(args[:6] + ["1"] + args[7:])
    assert_refused(result, str(root), "--ids/--seed", "--force")
    assert tree_snapshot(ws) == before and tree_snapshot(root) == raw_before
    # a set written by a generator with other settings (an older release) is not reused
    old = tmp_path / "older-generator"
    shutil.copytree(root, old)
    stamp = json.loads((old / "dmdl-synthetic.json").read_text())
    stamp["request"]["config"]["material_coupling"] = -0.5
    (old / "dmdl-synthetic.json").write_text(json.dumps(stamp))
    result = invoke(args[:8] + [old, "--workspace", tmp_path / "ws-old"])
    assert_refused(result, str(old), "generator settings", "--force")
    assert not (tmp_path / "ws-old" / "manifest.json").exists()


def _raw_images(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_synthetic_settings_come_from_the_recipe(tmp_path):
    """`--set synthetic.KEY=VALUE` reaches the generator and is recorded; --ids is synthetic.ids."""
    small = ["--ids", "3", "--set", "synthetic.height=32", "--set", "synthetic.width=16", *TINY_SIZE]
    sets = {}
    for name, extra in (("default", []), ("thermal", ["--set", "synthetic.material_coupling=-0.8"])):
        result = invoke(["prepare-data", "--dataset", "synthetic", "--workspace", tmp_path / name,
                         *small, *extra])
        assert result.exit_code == 0, result.output
        root = tmp_path / name / "synthetic"
        sets[name] = _raw_images(root)
        recorded = json.loads((root / "synthetic.json").read_text())
        assert recorded["ids"] == {"train": 1, "val": 1, "test": 1}
        coupling = -0.8 if name == "thermal" else 0.8
        assert recorded["config"]["material_coupling"] == coupling
        assert (recorded["config"]["height"], recorded["config"]["width"]) == (32, 16)
        stamp = json.loads((root / "dmdl-synthetic.json").read_text())["request"]
        assert (stamp["ids"], stamp["config"]["material_coupling"]) == (3, coupling)
        saved = load_recipe(tmp_path / name / "recipe.yaml")
        assert (saved.synthetic.ids, saved.synthetic.material_coupling) == (3, coupling)
    assert sets["default"].keys() == sets["thermal"].keys() and len(sets["default"]) == 3 * 6 * 5
    changed = [path for path in sets["default"] if sets["default"][path] != sets["thermal"][path]]
    # the coupling moves the visible garment colours; the infrared cameras (3, 6) see no change
    assert changed and all(path.split("/")[0] in ("cam1", "cam2", "cam4", "cam5") for path in changed)
    # the same settings again: the set is reused, not regenerated
    result = invoke(["prepare-data", "--dataset", "synthetic", "--workspace", tmp_path / "thermal",
                     *small, "--set", "synthetic.material_coupling=-0.8"])
    assert result.exit_code == 0 and "generated" not in result.output, result.output


def test_rerun_on_unchanged_source_is_a_noop(sysu_workspace, tmp_path, synthetic_root):
    ws = copy_workspace(sysu_workspace, tmp_path)
    before = tree_snapshot(ws)
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root,
                     "--workspace", ws])
    assert result.exit_code == 0, result.output
    assert "unchanged" in result.output and "nothing to do" in result.output
    check_table(result.output, expected_sysu(synthetic_root))
    assert tree_snapshot(ws) == before


def test_a_damaged_or_missing_cache_is_rebuilt_by_a_plain_rerun(sysu_workspace, tmp_path,
                                                                 synthetic_root):
    ws = copy_workspace(sysu_workspace, tmp_path)
    cache = ws / "data" / f"cache-{HEIGHT}x{WIDTH}.u8"
    good = sha256_file(cache)
    (ws / "stage1").mkdir()
    (ws / "stage1" / "final.pt").write_bytes(b"a trained model")  # must survive the repair
    row = HEIGHT * WIDTH * 3
    with open(cache, "r+b") as handle:  # a zeroed stretch: same size, other bytes
        handle.seek(7 * row)
        handle.write(bytes(3 * row))
    assert sha256_file(cache) != good
    # a stage opening it refuses in one line that names the cache and the plain repair
    result = invoke(["cluster", "--workspace", ws, "--checkpoint", "imagenet"])
    assert_refused(result, str(cache), "damaged", "prepare-data", "no --force needed")
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws])
    assert result.exit_code == 0, result.output
    assert "does not match its recorded sha256" in result.output and "unchanged" not in result.output
    assert sha256_file(cache) == good
    assert (ws / "stage1" / "final.pt").read_bytes() == b"a trained model"
    # the unchanged re-run checks the whole file and prints what that cost
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws])
    assert result.exit_code == 0 and "unchanged" in result.output
    assert re.search(r"checked the sha256 of data/cache-\S+ \([\d.]+ MiB, [\d.]+ s\)", result.output)
    # a workspace from before caches had records: checked against the manifest's sha256 and
    # given its record; caches were all resized bilinear then, so the bicubic recipe rebuilds it
    record = cache.with_name(cache.name + ".json")
    written = record.read_text()
    record.unlink()
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws])
    assert result.exit_code == 0 and "unchanged" not in result.output
    assert "added the checksum of each row" in result.output and "was resized bilinear" in result.output
    assert record.read_text() == written
    # missing: rebuilt the same way
    cache.unlink()
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws])
    assert result.exit_code == 0, result.output
    assert sha256_file(cache) == good


def test_changed_source_is_not_reindexed_without_force(tmp_path, synthetic_root):
    raw = copy_tree(synthetic_root, tmp_path)
    ws = tmp_path / "ws"
    assert prepare("sysu", raw, ws).exit_code == 0
    (ws / "stage1").mkdir()
    (ws / "stage1" / "last.pt").write_bytes(b"trained on the old index")
    victim = sorted((raw / "cam3").rglob("*.jpg"))[0]
    shutil.copyfile(sorted((raw / "cam1").rglob("*.jpg"))[0], victim)
    before = tree_snapshot(ws)
    result = prepare("sysu", raw, ws)
    assert_refused(result, str(raw), "changed", "--force")
    assert tree_snapshot(ws) == before
    result = prepare("sysu", raw, ws, "--force")
    assert result.exit_code == 0, result.output
    assert not (ws / "stage1").exists()  # --force removes the stage outputs of the old index
    assert not list(ws.glob(".retired-*"))  # moved aside, then deleted
    check_workspace(ws, expected_sysu(raw), "sysu", "sysu.yaml",
                    ["data.dataset=sysu", "data.trial=1", *TINY_SIZE[1::2]], prepare_runs=2)


# --------------------------------------------------------------------------------------------
# bad inputs: one line, non-zero exit, nothing changed
# --------------------------------------------------------------------------------------------

def test_missing_root(tmp_path, sysu_workspace):
    missing = tmp_path / "no-such-folder"
    fresh = tmp_path / "fresh-ws"
    result = prepare("sysu", missing, fresh)
    line = assert_refused(result, str(missing), "does not exist")
    assert result.output.strip() == line  # nothing else printed
    assert not fresh.exists()  # a failed first run leaves no workspace behind
    deep = tmp_path / "a" / "b" / "ws"
    assert_refused(prepare("sysu", missing, deep), "does not exist")
    assert not (tmp_path / "a").exists()
    empty = tmp_path / "empty-ws"
    empty.mkdir()
    assert_refused(prepare("sysu", missing, empty), "does not exist")
    assert tree_snapshot(empty) == {}  # not even a lock file left

    ws = copy_workspace(sysu_workspace, tmp_path)
    before = tree_snapshot(ws)
    assert_refused(prepare("sysu", missing, ws), str(missing))
    assert_refused(invoke(["prepare-data", "--dataset", "sysu", "--workspace", ws]), "--root is required")
    assert_refused(prepare("sysu", ws / "manifest.json", ws), "not a folder")
    result = prepare("market", missing, ws)  # a usage error naming the choices
    assert result.exit_code == 2 and "'market' is not one of sysu, regdb" in result.output
    assert tree_snapshot(ws) == before


@pytest.mark.parametrize("dataset, tree, words", [
    ("sysu", "regdb", ["SYSU-MM01", "cam1..cam6", "exp/train_id.txt"]),
    ("sysu", "llcm", ["SYSU-MM01", "cam1..cam6", "exp/train_id.txt"]),
    ("regdb", "sysu", ["RegDB", "Visible/", "Thermal/", "idx/"]),
    ("llcm", "regdb", ["LLCM", "idx/train_vis.txt"]),
    ("regdb", "llcm", ["RegDB", "missing Visible/, Thermal/"]),
])
def test_root_in_another_layout(tmp_path, request, dataset, tree, words):
    root = request.getfixturevalue({"sysu": "synthetic_root", "regdb": "regdb_root",
                                    "llcm": "llcm_root"}[tree])
    ws = tmp_path / "ws"
    result = prepare(dataset, root, ws)
    assert_refused(result, str(root), *words)
    assert result.output.strip().count("\n") == 0
    assert not ws.exists()


def test_missing_and_empty_id_files(tmp_path, synthetic_root, regdb_root):
    ws = tmp_path / "ws"
    raw = copy_tree(synthetic_root, tmp_path, "sysu-no-test")
    (raw / "exp" / "test_id.txt").unlink()
    assert_refused(prepare("sysu", raw, ws), str(raw / "exp" / "test_id.txt"), "missing")
    raw = copy_tree(synthetic_root, tmp_path, "sysu-empty-train")
    (raw / "exp" / "train_id.txt").write_text("")
    assert_refused(prepare("sysu", raw, ws), str(raw / "exp" / "train_id.txt"), "empty")
    raw = copy_tree(synthetic_root, tmp_path, "sysu-garbage")
    (raw / "exp" / "val_id.txt").write_text("1,two,3\n")
    assert_refused(prepare("sysu", raw, ws), str(raw / "exp" / "val_id.txt"), "'two'")

    raw = copy_tree(regdb_root, tmp_path, "regdb-missing")
    (raw / "idx" / "test_thermal_1.txt").unlink()
    assert_refused(prepare("regdb", raw, ws), str(raw / "idx" / "test_thermal_1.txt"), "missing")
    raw = copy_tree(regdb_root, tmp_path, "regdb-empty")
    (raw / "idx" / "train_visible_1.txt").write_text("\n")
    assert_refused(prepare("regdb", raw, ws), str(raw / "idx" / "train_visible_1.txt"), "empty")
    raw = copy_tree(regdb_root, tmp_path, "regdb-dangling")
    with open(raw / "idx" / "test_visible_1.txt", "a") as f:
        f.write("Visible/0999/0001.jpg 999\n")
    assert_refused(prepare("regdb", raw, ws), str(raw / "idx" / "test_visible_1.txt"),
                   "Visible/0999/0001.jpg", "do not exist")
    assert not ws.exists()


def test_id_file_naming_identities_without_images(tmp_path, synthetic_root, sysu_workspace):
    raw = copy_tree(synthetic_root, tmp_path)
    ids = (raw / "exp" / "test_id.txt").read_text().strip()
    (raw / "exp" / "test_id.txt").write_text(ids + ",998,999\n")
    ws = tmp_path / "ws"
    assert_refused(prepare("sysu", raw, ws), "2 identities", "exp/test_id.txt", "0998", "0999",
                   "no images")
    assert not ws.exists()


def _corrupt(paths: list[Path]) -> dict[str, str]:
    """Make paths unreadable in three ways; returns path -> reason word."""
    kinds = {}
    for i, path in enumerate(paths):
        if i % 3 == 0:
            path.write_bytes(b"")
            kinds[str(path)] = "empty file (0 bytes)"
        elif i % 3 == 1:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            kinds[str(path)] = "truncated or corrupt"
        else:
            path.write_text("this is not an image\n")
            kinds[str(path)] = "not an image"
    return kinds


def test_bad_images_are_listed_and_can_be_skipped(tmp_path, synthetic_root):
    raw = copy_tree(synthetic_root, tmp_path)
    images = sorted(raw.rglob("*.jpg"))
    kinds = _corrupt(images[:3])
    ws = tmp_path / "ws"
    result = prepare("sysu", raw, ws)
    line = assert_refused(result, "3 unreadable images", "--skip-bad-images")
    for path, reason in kinds.items():
        assert f"{path} ({reason}" in line
    assert not ws.exists()

    result = prepare("sysu", raw, ws, "--skip-bad-images")
    assert result.exit_code == 0, result.output
    assert "excluding 3 unreadable images" in result.output
    rows = [r for r in expected_sysu(raw) if r[0] not in kinds]
    check_workspace(ws, rows, "sysu", "sysu.yaml",
                    ["data.dataset=sysu", "data.trial=1", *TINY_SIZE[1::2]])
    check_table(result.output, rows)
    skipped = json.loads((ws / "manifest.json").read_text())["dataset"]["skipped_bad_images"]
    assert {s["path"] for s in skipped} == set(kinds)
    assert all(s["reason"].startswith(kinds[s["path"]]) for s in skipped)
    # unchanged source: still a no-op
    before = tree_snapshot(ws)
    result = prepare("sysu", raw, ws, "--skip-bad-images")
    assert result.exit_code == 0 and "unchanged" in result.output
    assert tree_snapshot(ws) == before


def test_more_than_ten_bad_images_lists_ten_and_counts_all(tmp_path, synthetic_root):
    raw = copy_tree(synthetic_root, tmp_path)
    kinds = _corrupt(sorted(raw.rglob("*.jpg"))[:12])
    ws = tmp_path / "ws"
    line = assert_refused(prepare("sysu", raw, ws), "12 unreadable images", "and 2 more")
    assert sum(path in line for path in kinds) == 10
    assert not ws.exists()


def test_workspace_of_another_dataset_is_refused_unless_force(tmp_path, sysu_workspace,
                                                              regdb_root, synthetic_root):
    ws = copy_workspace(sysu_workspace, tmp_path)
    (ws / "stage1").mkdir()
    (ws / "stage1" / "last.pt").write_bytes(b"weights")
    before = tree_snapshot(ws)
    line = assert_refused(prepare("regdb", regdb_root, ws), str(ws), "prepared from sysu",
                          str(synthetic_root), "--force")
    assert "\n" not in line
    assert tree_snapshot(ws) == before
    # the same data set from another folder is another data set too
    other = copy_tree(synthetic_root, tmp_path, "other")
    assert_refused(prepare("sysu", other, ws), "prepared from sysu", "--force")
    assert tree_snapshot(ws) == before

    result = prepare("regdb", regdb_root, ws, "--force")
    assert result.exit_code == 0, result.output
    assert not (ws / "stage1").exists()
    manifest = json.loads((ws / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "regdb"
    assert [r["stage"] for r in manifest["runs"]] == ["prepare-data", "prepare-data"]
    _, rows = read_index_csv(ws)
    assert sorted(rows) == sorted(expected_regdb(regdb_root, 1))
    assert load_recipe(ws / "recipe.yaml").data.dataset == "regdb"


def test_second_writer_is_refused_naming_the_holder(tmp_path, sysu_workspace, synthetic_root):
    ws = copy_workspace(sysu_workspace, tmp_path)
    code = textwrap.dedent(f"""
        import time
        from dmdl_cli.workspace import Workspace
        with Workspace({str(ws)!r}).locked():
            print("ready", flush=True)
            time.sleep(120)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        before = tree_snapshot(ws)
        result = prepare("sysu", synthetic_root, ws, "--force")
        assert_refused(result, str(ws), "in use by another dmdl process", f"pid {holder.pid}")
        assert tree_snapshot(ws) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stderr.close()
    # the holder died: the workspace is usable again
    result = prepare("sysu", synthetic_root, ws)
    assert result.exit_code == 0 and "unchanged" in result.output


def test_unreadable_format_version_is_refused_by_every_command(tmp_path, sysu_workspace,
                                                              synthetic_root):
    ws = copy_workspace(sysu_workspace, tmp_path)
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest["format_version"] = 99
    (ws / "manifest.json").write_text(json.dumps(manifest))
    before = tree_snapshot(ws)
    commands = [
        ["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws],
        ["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws, "--force"],
        ["pretrain-single", "--workspace", ws],
        ["cluster", "--workspace", ws, "--checkpoint", "imagenet"],
        ["train-cross", "--workspace", ws],
        ["evaluate", "--workspace", ws, "--checkpoint", "imagenet"],
        ["export", "--workspace", ws],
        ["select", "--workspace", ws],
        ["report", ws],
    ]
    assert {c[0] for c in commands} == set(COMMANDS)
    for args in commands:
        result = invoke(args)
        line = assert_refused(result, str(ws / "manifest.json"), "format version 99", "reads version 1")
        assert result.output.strip() == line, args
    assert tree_snapshot(ws) == before


def test_markup_like_text_in_an_error_is_printed_verbatim(tmp_path):
    missing = tmp_path / "SYSU [copy]" / "[/x]"
    ws = tmp_path / "ws"
    result = prepare("sysu", missing, ws)
    assert_refused(result, str(missing))
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", tmp_path, "--workspace", ws,
                     "--set", "model.arch=[/bold]"])
    assert_refused(result, "model.arch=[/bold]", "expected str")
    assert not ws.exists()


@pytest.mark.parametrize("override, words", [
    ("stage1.epoch=3", ["unknown recipe key 'stage1.epoch'", "epochs"]),
    ("model.arch=vgg", ["'model.arch'", "'vgg' is not one of", "resnet50_agw"]),
    ("cluster.eps=2", ["'cluster.eps'", "outside the open interval (0.0, 1.0)"]),
    ("data.height", ["--set 'data.height'", "KEY=VALUE"]),
])
def test_bad_recipe_overrides_are_one_line(tmp_path, sysu_workspace, synthetic_root, override, words):
    fresh = tmp_path / "fresh"
    result = prepare("sysu", synthetic_root, fresh, "--set", override)
    line = assert_refused(result, *words)
    assert result.output.strip() == line
    assert not fresh.exists()
    ws = copy_workspace(sysu_workspace, tmp_path)
    before = tree_snapshot(ws)
    assert_refused(prepare("sysu", synthetic_root, ws, "--set", override), *words)
    assert_refused(invoke(["cluster", "--workspace", ws, "--set", override]), *words)
    assert tree_snapshot(ws) == before


def test_overlays_and_sets_reach_the_saved_recipe(tmp_path, synthetic_root, regdb_root):
    ws = tmp_path / "ws"
    overlay = REPO / "recipes" / "ablation" / "baseline.yaml"
    result = prepare("sysu", synthetic_root, ws, "--overlay", overlay, "--set", "stage1.lr=1e-4",
                     "--set", "stage1.triplet_ramp=[[1, 1.0]]")
    assert result.exit_code == 0, result.output
    saved = load_recipe(ws / "recipe.yaml")
    assert not saved.cai.enabled and not saved.cbt.align  # from the overlay
    assert saved.stage1.lr == 1e-4 and saved.stage1.triplet_ramp == [[1, 1.0]]
    assert saved.data.height == HEIGHT and saved.model.arch == "resnet50_agw"  # from sysu.yaml
    assert_refused(prepare("regdb", regdb_root, tmp_path / "ws2", "--trial", "11"),
                   "'data.trial'", "above the maximum 10")
    assert not (tmp_path / "ws2").exists()


def test_a_cache_of_another_resize_filter_is_rebuilt_by_a_plain_rerun(sysu_workspace, tmp_path,
                                                                      synthetic_root):
    # a workspace prepared before caches were resized bicubic: its record names no filter
    # (bilinear, the only one then); the shipped recipes now ask data.resize bicubic
    ws = copy_workspace(sysu_workspace, tmp_path)
    cache = ws / "data" / f"cache-{HEIGHT}x{WIDTH}.u8"
    record = cache.with_name(cache.name + ".json")
    bicubic = sha256_file(cache)
    assert json.loads(record.read_text())["resize"] == "bicubic"
    old = {k: v for k, v in json.loads(record.read_text()).items() if k != "resize"}
    record.write_text(json.dumps(old))
    result = invoke(["cluster", "--workspace", ws, "--checkpoint", "imagenet"])
    assert_refused(result, str(cache), "resized bilinear", "data.resize bicubic", "prepare-data",
                   "no --force needed")
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws])
    assert result.exit_code == 0, result.output
    assert "was resized bilinear" in result.output and "rebuilding it" in result.output
    assert json.loads(record.read_text())["resize"] == "bicubic" and sha256_file(cache) == bicubic
    result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root, "--workspace", ws])
    assert result.exit_code == 0 and "unchanged" in result.output
