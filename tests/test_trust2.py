"""Trust, round 2: what a full disk, a flipped byte, a killed ``--force``, a group-shared
workspace and hand-edited inputs must not cost a user (issue 23). Each test reproduces one
finding of the hostile pass and checks the one line or the right answer that replaces it.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SIZE, assert_refused, copy_workspace, invoke

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL_NET = ("--set", "model.arch=resnet18", "--set", "model.pretrained=null")


def test_lock_files_follow_the_umask_so_a_group_can_run_commands(tmp_path, synthetic_root):
    ws = tmp_path / "ws"
    old = os.umask(0o002)
    try:
        result = invoke(["prepare-data", "--dataset", "sysu", "--root", synthetic_root,
                         "--workspace", ws, *TINY_SIZE, *SMALL_NET])
        assert result.exit_code == 0, result.output
        result = invoke(["evaluate", "--workspace", ws, "--checkpoint", "imagenet",
                         "--mode", "all-search", "--trials", "1"])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    locks = sorted(ws.glob(".*lock*"))
    assert {p.name for p in locks} >= {".lock", ".manifest.lock", ".lock-eval"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in locks} == {p.name: 0o664 for p in locks}


def test_a_lock_file_of_another_user_is_locked_read_only(tmp_path, monkeypatch):
    """A group member who cannot write a lock file made by its owner (umask 022 then) still
    takes the flock: it needs no write access."""
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.workspace import WorkspaceLock

    (tmp_path / ".lock").write_text("")
    real_open = os.open

    def no_write(path, flags, *args):
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_write)
    lock = WorkspaceLock(tmp_path / ".lock", holder="stage 1 (pretrain-single)")
    lock.acquire()
    try:
        with pytest.raises(DmdlError, match="in use by another dmdl process"):
            WorkspaceLock(tmp_path / ".lock").acquire()
    finally:
        lock.release()
    again = WorkspaceLock(tmp_path / ".lock")
    again.acquire()  # released: free again
    again.release()


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    from PIL import Image

    from dmdl_cli.data.cache import load_image
    from dmdl_cli.inference import _to_array

    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(64, 32) * 32).astype(np.uint16)  # 0..65504
    Image.fromarray(ramp).save(tmp_path / "ir16.png")
    with Image.open(tmp_path / "ir16.png") as img:
        assert img.mode.startswith("I")  # what PIL reads a 16-bit PNG as
    cached = load_image(str(tmp_path / "ir16.png"), 64, 32)
    expected = np.round(ramp / 257).astype(np.uint8)
    assert np.array_equal(cached[..., 0], expected) and np.array_equal(cached[..., 2], expected)
    assert (cached == 255).mean() < 0.01  # was 99.9 % white
    assert np.array_equal(_to_array(tmp_path / "ir16.png", 64, 32), cached)  # dmdl_cli.embed alike


def test_a_very_large_image_decodes_without_a_decompression_bomb_warning(tmp_path, recwarn):
    from PIL import Image

    from dmdl_cli.data.cache import load_image
    from dmdl_cli.data.sources import find_bad_images

    Image.new("L", (10000, 10000), color=90).save(tmp_path / "big.png")  # 10^8 pixels
    assert find_bad_images([str(tmp_path / "big.png")], workers=1) == []
    assert load_image(str(tmp_path / "big.png"), 8, 4).max() == 90
    assert not [w for w in recwarn if "decompression" in str(w.message).lower()]


# -- recipe values ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["stage1.lr", "cai.weight", "stage2.weight_decay",
                                 "stage1.triplet_margin"])
@pytest.mark.parametrize("text", [".inf", "-.inf", "1e400", ".nan"])
def test_a_non_finite_float_is_refused_naming_the_key(tmp_path, key, text):
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.recipe import load_recipe

    section, name = key.split(".")
    path = tmp_path / "r.yaml"
    path.write_text(f"{section}:\n  {name}: {text}\n")
    for source in ({"path": path}, {"overrides": [f"{key}={text}"]}):
        with pytest.raises(DmdlError, match=rf"'{key}'.*finite") as err:
            load_recipe(**source)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, words", [
    ("stage1.lr=0", ["stage1.lr", "above 0"]),
    ("stage1.iters=100000000000", ["stage1.iters", "maximum"]),
    ("train.seed=12345678901234567890", ["train.seed", "maximum"]),
    ("stage2.epochs=99999999", ["stage2.epochs", "maximum"]),
    ("run.feature_batch=10000000000", ["run.feature_batch", "maximum"]),
    ("stage1.triplet_ramp=[[0, .inf]]", ["stage1.triplet_ramp", "finite"]),
    ("augment.erasing_ratio=[0.3, .inf]", ["augment.erasing_ratio", "finite"]),
])
def test_values_out_of_a_sane_range_are_refused_naming_the_key_and_the_range(override, words):
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.recipe import load_recipe

    with pytest.raises(DmdlError) as err:
        load_recipe(overrides=[override, "stage1.epochs=50"])
    for word in words:
        assert word in str(err.value), str(err.value)


def test_a_section_or_key_given_twice_is_refused_with_both_lines(tmp_path):
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.recipe import load_recipe

    twice = tmp_path / "twice.yaml"
    twice.write_text("stage1:\n  lr: 0.1\ncai:\n  weight: 1.0\nstage1:\n  epochs: 2\n")
    with pytest.raises(DmdlError, match=r"twice\.yaml.*'stage1' is given twice \(lines 1 and 5\)"):
        load_recipe(twice)
    twice.write_text("stage1:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(DmdlError, match=r"'lr' is given twice \(lines 2 and 3\)"):
        load_recipe(twice)


def test_yaml_1_1_words_where_a_string_is_expected(tmp_path):
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("train:\n  amp: off\ncbt:\n  augment: no\n  refine: yes\n")
    recipe = load_recipe(path)
    assert recipe.train.amp == "off"  # a listed word, not the boolean YAML 1.1 reads
    assert recipe.cbt.augment is False and recipe.cbt.refine is True  # booleans stay booleans
    assert load_recipe(overrides=["train.amp=off"]).train.amp == "off"
    assert "amp: 'off'" in recipe.to_yaml()  # written back quoted, read back the same
    path.write_text("train:\n  amp: false\n")
    with pytest.raises(DmdlError, match=r"'train.amp'.*got false.*quote"):
        load_recipe(path)


def test_a_binary_recipe_file_is_one_line(tmp_path):
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DmdlError, match=r"r\.yaml.*not a text file"):
        load_recipe(path)


# -- the ledger -------------------------------------------------------------------------------


def _prepare_tiny_again(ws: Path, tiny_workspace: Path, *extra: str):
    """``prepare-data`` with the options that prepared ``tiny_workspace`` (copied to ``ws``)."""
    from conftest import TINY_WORKSPACE_IDS

    return invoke(["prepare-data", "--dataset", "synthetic", "--ids", str(TINY_WORKSPACE_IDS),
                   "--seed", "0", "--root", tiny_workspace.parent / "synthetic", "--workspace", ws,
                   *TINY_SIZE, *extra])


@pytest.mark.parametrize("damage", ["binary", "truncated"])
def test_a_damaged_manifest_is_one_line_and_prepare_data_repairs_it(tiny_workspace, tmp_path, damage):
    import json

    ws = copy_workspace(tiny_workspace, tmp_path)
    good = (ws / "manifest.json").read_bytes()
    bad = bytes(range(256)) * 8 if damage == "binary" else good[: len(good) // 2]
    (ws / "manifest.json").write_bytes(bad)
    line = assert_refused(invoke(["evaluate", "--workspace", ws, "--checkpoint", "imagenet"]),
                          "manifest.json", "prepare-data")
    assert "manifest.json.damaged" in line
    result = _prepare_tiny_again(ws, tiny_workspace)
    assert result.exit_code == 0, result.output
    assert "kept as" in result.output and "nothing to do" in result.output
    assert (ws / "manifest.json.damaged").read_bytes() == bad  # nothing is lost
    manifest = json.loads((ws / "manifest.json").read_text())
    assert manifest["dataset"]["index_sha256"] == json.loads(good)["dataset"]["index_sha256"]
    assert manifest["runs"][-1]["stage"] == "prepare-data"
    result = invoke(["evaluate", "--workspace", ws, "--checkpoint", "imagenet",
                     "--mode", "all-search", "--trials", "1"])
    assert result.exit_code == 0, result.output


# -- checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_tiny(tiny_workspace, tmp_path_factory, request) -> Path:
    """``tiny_workspace`` after one stage-1 step (copy it before writing); its 0.2 GB of
    checkpoints go when the module is done."""
    from conftest import STAGE1_SETS, discard_when_done, set_args

    ws = copy_workspace(tiny_workspace, tmp_path_factory.mktemp("stage1-tiny"))
    result = invoke(["pretrain-single", "--workspace", ws, "--deterministic", *set_args(STAGE1_SETS)])
    assert result.exit_code == 0, result.output
    yield ws
    discard_when_done(request, ws.parent)


@pytest.fixture
def trained_copy(stage1_tiny, tmp_path):
    """A copy of ``stage1_tiny`` whose checkpoints are hard links (dmdl replaces a checkpoint by
    a rename, never writes into it, so the fixture stays as it was), deleted after the test:
    the tests that train or edit checkpoints leave no 100 MB copies behind."""
    import shutil

    from conftest import linked_workspace

    ws = linked_workspace(stage1_tiny, tmp_path / "ws")
    yield ws
    shutil.rmtree(ws, ignore_errors=True)


def _edit_resume_point(path: Path, edit) -> None:
    from dmdl_cli.workspace import load_checkpoint, save_checkpoint

    state = load_checkpoint(path)
    state["meta"]["step"] = 0  # a partial run: --resume trains its one step again
    edit(state)
    save_checkpoint(path, state)


def _pop(key):
    return lambda state: state.pop(key)


@pytest.mark.parametrize("edit, words", [
    (lambda s: None, None),  # the control: an untouched partial run resumes
    (lambda s: s["meta"].update(step=-1), ["meta.step -1"]),
    (lambda s: s["meta"].update(step=10**9), ["meta.step 1000000000"]),
    (lambda s: s["meta"].update(epoch=99), ["meta.epoch 99"]),
    (lambda s: s["meta"].update(epoch="0"), ["meta.epoch '0'"]),
    (lambda s: s["epoch_state"].update(labels=s["epoch_state"]["labels"][:-5]),
     ["epoch_state.labels", "265", "270 integers"]),
    (lambda s: s["epoch_state"]["labels"].__setitem__(0, 10**9), ["ids outside -1.."]),
    (_pop("rng"), ["'rng' entry is missing"]),
    (_pop("optimizer"), ["'optimizer' entry is missing"]),
    (lambda s: s["model"].update({next(iter(s["model"])): torch.zeros(2, 2)}),
     ["RuntimeError", "size mismatch"]),
    (lambda s: s["rng"].update(numpy={"name": "MT19937"}), ["KeyError"]),
], ids=["control", "negative-step", "huge-step", "epoch-99", "epoch-text", "short-labels",
        "huge-label", "no-rng", "no-optimizer", "wrong-shape", "bad-rng"])
def test_a_hand_edited_resume_point_is_one_line_and_trains_nothing(trained_copy, edit, words):
    from conftest import STAGE1_SETS, set_args

    ws = trained_copy
    (ws / "stage1" / "final.pt").unlink()
    _edit_resume_point(ws / "stage1" / "last.pt", edit)
    result = invoke(["pretrain-single", "--workspace", ws, "--resume", *set_args(STAGE1_SETS)])
    if words is None:
        assert result.exit_code == 0, result.output
        assert (ws / "stage1" / "final.pt").is_file()
        return
    assert_refused(result, "stage1/last.pt cannot be resumed", "--force", *words)
    assert not (ws / "stage1" / "final.pt").exists()  # was written at once for epoch 99


@pytest.mark.parametrize("edit, words", [
    (lambda s: s["meta"].update(extra={"__numpy__": 5}), ["damaged", "array entry"]),
    (lambda s: s["meta"].update(extra={"__numpy__": torch.zeros(2), "dtype": "zz"}),
     ["damaged", "array entry"]),
    (lambda s: s.update(model=list(s["model"].values())), ["model is a list"]),
    (lambda s: s["meta"]["recipe"]["model"].pop("arch"), ["'model.arch'", "meta.recipe"]),
    (lambda s: s["meta"]["recipe"]["model"].update(gem_p="abc"), ["'model.gem_p'", "'abc'"]),
], ids=["numpy-tag", "bad-dtype", "model-list", "no-arch", "gem_p-text"])
def test_a_malformed_checkpoint_is_one_line_for_evaluate(stage1_tiny, tmp_path, edit, words):
    path = tmp_path / "edited.pt"
    state = torch.load(stage1_tiny / "stage1" / "final.pt", weights_only=True)
    edit(state)
    torch.save(state, path)
    try:
        assert_refused(invoke(["evaluate", "--workspace", stage1_tiny, "--checkpoint", path,
                               "--mode", "all-search", "--trials", "1"]), str(path), *words)
    finally:
        path.unlink()  # 45 MB each


def test_a_crafted_pickle_is_refused_in_one_line_without_torch_warnings_or_advice(tiny_workspace,
                                                                                  tmp_path, recwarn):
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    path = tmp_path / "evil.pt"  # a plain pickle (protocol 4): torch warns about its protocol
    path.write_bytes(pickle.dumps({"model": {}, "meta": {"run": Payload()}}, protocol=4))
    result = invoke(["evaluate", "--workspace", tiny_workspace, "--checkpoint", path])
    assert_refused(result, str(path))
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "pwned").exists()
    assert "weights_only" not in result.output
    assert not [w for w in recwarn if "pickle" in str(w.message)]  # torch's protocol note


# -- raw data sets ----------------------------------------------------------------------------


def test_an_empty_sysu_camera_folder_is_refused(synthetic_root, tmp_path):
    import shutil

    from dmdl_cli.data.sources import read_sysu
    from dmdl_cli.errors import DmdlError

    root = tmp_path / "sysu"
    shutil.copytree(synthetic_root, root)
    for folder in (root / "cam3").iterdir():
        shutil.rmtree(folder)  # the camera folder is there, its images are not
    with pytest.raises(DmdlError, match=r"cam3 holds no images"):
        read_sysu(root)


def test_a_regdb_list_line_outside_the_root_is_refused(regdb_root, tmp_path):
    import shutil

    from dmdl_cli.data.sources import read_regdb
    from dmdl_cli.errors import DmdlError

    root = tmp_path / "RegDB"
    shutil.copytree(regdb_root, root)
    (tmp_path / "outside").mkdir()
    shutil.copy(next((root / "Visible").rglob("*.jpg")), tmp_path / "outside" / "x.jpg")
    listing = root / "idx" / "train_visible_1.txt"
    lines = listing.read_text().splitlines() + ["../outside/x.jpg 0"]
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(DmdlError, match=rf"train_visible_1.txt:{len(lines)}: .*outside"):
        read_regdb(root, trial=1)


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MiB tmpfs (root only; skipped elsewhere): a disk that really fills up, where a write
    through a memory map is a SIGBUS rather than an error (``ulimit -f`` does not show that)."""
    import subprocess

    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        import gc

        gc.collect()  # memory maps of an in-process command may still hold files there
        if subprocess.run(["umount", str(mount)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)


def _dmdl(*args, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dmdl_cli", *map(str, args)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], timeout=600,
                          env={**os.environ, "DMDL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
                               **(env or {})})


def test_a_full_disk_during_prepare_data_is_one_line_and_leaves_nothing_behind(tiny_workspace,
                                                                                small_filesystem):
    import json

    from conftest import TINY_WORKSPACE_IDS

    ws = small_filesystem / "ws"
    args = ["prepare-data", "--dataset", "synthetic", "--ids", TINY_WORKSPACE_IDS, "--seed", "0",
            "--root", tiny_workspace.parent / "synthetic", "--workspace", ws, "--set", "run.workers=1"]
    proc = _dmdl(*args, "--set", "data.height=128", "--set", "data.width=64")  # 6.6 MiB of cache
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, (proc.returncode, out)  # was 135: SIGBUS, no message
    assert len(out.strip().splitlines()) == 3 and "Traceback" not in out, out  # read, checked, error
    line = [x for x in out.splitlines() if x.startswith("error:")][0]
    assert "cache-128x64.u8" in line and "No space left" in line and "MiB" in line, line
    assert not [p for p in ws.rglob("*") if p.name.endswith(".tmp")]  # nothing keeps the disk full
    assert (ws / ".lock").read_text() == ""  # no dead holder named
    assert json.loads((ws / "manifest.json").read_text())["runs"][-1]["status"] == "failed"
    result = invoke([*args, "--set", "data.height=64", "--set", "data.width=32"])  # 1.6 MiB: fits
    assert result.exit_code == 0, result.output


def test_a_disk_that_fills_while_rows_are_written_is_one_line(tmp_path, monkeypatch, images_on_disk):
    """Where space cannot be reserved up front (a file system without fallocate), the write
    that finds the disk full is the error: no temporary file stays."""
    import errno

    from dmdl_cli.data import cache as cache_module
    from dmdl_cli.errors import DmdlError

    def no_fallocate(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    real_pwrite, written = os.pwrite, []

    def filling_pwrite(fd, data, offset):
        if sum(written) > 2 * 16 * 8 * 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(cache_module.os, "posix_fallocate", no_fallocate)
    monkeypatch.setattr(cache_module.os, "pwrite", filling_pwrite)
    out = tmp_path / "data" / "cache-16x8.u8"
    with pytest.raises(DmdlError, match=r"cannot write .*cache-16x8\.u8: No space left on device "
                                        r"\(free some disk space\)"):
        cache_module.build_cache(images_on_disk * 50, out, 16, 8, workers=2, progress=False)
    assert list(out.parent.iterdir()) == []


@pytest.fixture
def images_on_disk(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (30, 14, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


# -- a flipped byte ---------------------------------------------------------------------------


def _evaluate(ws: Path):
    import json

    result = invoke(["evaluate", "--workspace", ws, "--checkpoint", "imagenet", "--mode",
                     "all-search", "--trials", "1"])
    if result.exit_code != 0:
        return result, None, None
    report = json.loads(next((ws / "eval").glob("all-search-*.json")).read_text())
    entry = json.loads((ws / "manifest.json").read_text())["runs"][-1]
    return result, report["mean"]["mAP"], entry


def _flip_byte(ws: Path, row: int) -> None:
    path = ws / "data" / "cache-64x32.u8"
    offset = row * 64 * 32 * 3 + 1000
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_any_row_stops_evaluate_and_prepare_data_repairs_it(tiny_workspace,
                                                                              tmp_path):
    import hashlib
    import shutil

    from dmdl_cli.data.cache import open_cache
    from dmdl_cli.data.index import read_index

    ws = copy_workspace(tiny_workspace, tmp_path)
    index = read_index(ws / "data" / "index.csv")
    test_rows = index.rows(split="test")
    old_sample = set(np.linspace(0, len(index) - 1, 256).round().astype(int))  # the old quick check
    row = int(next(r for r in test_rows if r not in old_sample))
    result, clean_map, entry = _evaluate(ws)
    assert result.exit_code == 0, result.output
    # the ledger says which rows were read: the sha256 of their checksums, in row order
    sums = open_cache(ws / "data" / "cache-64x32.u8", len(index), 64, 32).checksums
    cache_input = next(r for r in entry["inputs"] if r["path"] == "data/cache-64x32.u8")
    assert cache_input["rows_read"] == len(test_rows)
    assert cache_input["read_sha256"] == hashlib.sha256(sums[np.sort(test_rows)].astype(">u4")
                                                        .tobytes()).hexdigest()

    shutil.rmtree(ws / "features")  # so that the evaluation reads the cache again
    _flip_byte(ws, row)
    result, _, _ = _evaluate(ws)
    assert_refused(result, "cache-64x32.u8", f"row {row} ", "checksum", "prepare-data")
    result = _prepare_tiny_again(ws, tiny_workspace)
    assert result.exit_code == 0 and "rebuilding" in result.output, result.output
    result, repaired_map, _ = _evaluate(ws)
    assert result.exit_code == 0 and repaired_map == clean_map  # the right answer again


def test_features_of_another_cache_are_never_served(tiny_workspace, tmp_path):
    """Features are keyed by the cache they came from: after the cache is rebuilt into other
    bytes (other images, a repair), the old features are not reused."""
    import shutil

    from dmdl_cli.data.cache import cache_record, write_record
    from dmdl_cli.data.index import read_index

    ws = copy_workspace(tiny_workspace, tmp_path)
    n = len(read_index(ws / "data" / "index.csv"))
    result, first_map, _ = _evaluate(ws)
    assert result.exit_code == 0, result.output
    cache = ws / "data" / "cache-64x32.u8"
    rows = np.fromfile(cache, dtype=np.uint8).reshape(n, 64, 32, 3)
    rows[::2] = rows[::2, :, ::-1]  # every other image mirrored: another, valid cache
    rows.tofile(cache)
    write_record(cache, cache_record(cache, n, 64, 32, resize="bicubic"))  # the demo recipe's
    result, second_map, entry = _evaluate(ws)
    assert result.exit_code == 0, result.output
    assert "read cached features" not in result.output
    shutil.rmtree(ws / "features")
    result, fresh_map, _ = _evaluate(ws)
    assert second_map == fresh_map  # what the repaired cache gives, not the old features
    assert any(r["path"].startswith("features/") for r in entry["outputs"])
    result, again_map, entry = _evaluate(ws)
    assert "read cached features" in result.output and again_map == fresh_map
    cache_input = next(r for r in entry["inputs"] if r["path"] == "data/cache-64x32.u8")
    assert cache_input["rows_read"] == 0  # nothing of the cache was read: the features were
    assert any(r["path"].startswith("features/") for r in entry["inputs"])


def test_a_damaged_row_read_by_a_loader_process_is_one_line(tmp_path, images_on_disk):
    import torch.utils.data

    from dmdl_cli.data.augment import AugmentConfig
    from dmdl_cli.data.cache import CacheDamaged, build_cache
    from dmdl_cli.data.train_dataset import ViewDataset, collate_items, worker_error

    out = tmp_path / "cache-16x8.u8"
    cache = build_cache(images_on_disk * 3, out, 16, 8, workers=1, progress=False)
    data = bytearray(out.read_bytes())
    data[5 * 16 * 8 * 3 + 7] ^= 1
    out.write_bytes(bytes(data))
    dataset = ViewDataset(cache, np.zeros(12, np.int64), AugmentConfig())
    loader = torch.utils.data.DataLoader(dataset, num_workers=1, batch_sampler=[[(4, 0, 0), (5, 0, 0)]],
                                         collate_fn=collate_items)
    with pytest.raises(CacheDamaged) as err:
        for _ in loader:
            pass
    line = str(worker_error(err.value))
    assert "\n" not in line and line.startswith(f"{out}: row 5 ") and "checksum" in line, line


# -- a stage's files change only when its run commits -----------------------------------------


def test_a_force_run_that_fails_before_its_first_checkpoint_changes_nothing(trained_copy,
                                                                           monkeypatch, snapshot):
    from conftest import STAGE1_SETS, STAGE2_SETS, set_args
    from dmdl_cli.errors import DmdlError
    from dmdl_cli.training import hooks

    ws = trained_copy
    before = {**snapshot(ws / "stage1"), **snapshot(ws / "labels")}

    def full_disk(path, state):
        raise DmdlError(f"cannot write {path}: No space left on device (free some disk space)")

    monkeypatch.setattr(hooks, "save_checkpoint", full_disk)
    # another stage-1 recipe: it got as far as labelling its first epoch, then the disk was full
    result = invoke(["pretrain-single", "--workspace", ws, "--force",
                     *set_args([*STAGE1_SETS, "stage1.lr=0.001"])])
    assert_refused(result, "stage1/last.pt", "No space left")
    monkeypatch.undo()
    assert {**snapshot(ws / "stage1"), **snapshot(ws / "labels")} == before  # recipe.yaml too
    # stage 2 still builds on the stage-1 model that is there (was: "another stage-1 recipe")
    result = invoke(["train-cross", "--workspace", ws, *set_args(STAGE2_SETS)])
    assert result.exit_code == 0, result.output


def test_a_killed_run_leaves_files_the_next_run_removes(trained_copy, snapshot):
    from conftest import STAGE1_SETS, set_args

    ws = trained_copy
    before = snapshot(ws / "stage1")
    left = [ws / "stage1" / ".recipe.yaml.pending", ws / "labels" / ".stage1-e001.npz.pending",
            ws / "stage1" / ".last.pt.k2j4x9.tmp"]  # what kill -9 at those moments leaves
    for path in left:
        path.write_bytes(b"half")
    result = invoke(["pretrain-single", "--workspace", ws, "--resume", *set_args(STAGE1_SETS)])
    assert result.exit_code == 0 and "nothing to resume" in result.output  # finished: untouched
    result = invoke(["pretrain-single", "--workspace", ws, "--force", "--deterministic",
                     *set_args(STAGE1_SETS)])
    assert result.exit_code == 0 and "removed 3 files a stopped stage1 run left" in result.output
    assert not any(path.exists() for path in left)
    after = snapshot(ws / "stage1")
    for name in ("final.pt", "last.pt", "recipe.yaml"):  # --deterministic: the same files again
        assert after[name] == before[name], name


def test_resume_and_force_together_are_refused(trained_copy, snapshot):
    ws = trained_copy
    before = snapshot(ws)
    assert_refused(invoke(["pretrain-single", "--workspace", ws, "--resume", "--force"]),
                   "--resume", "--force")
    assert snapshot(ws) == before


def test_a_broken_pipe_stops_the_run_as_interrupted_and_changes_nothing(trained_copy,
                                                                        snapshot):
    import json
    import subprocess
    import sys

    from conftest import STAGE1_SETS, set_args

    ws = trained_copy
    before = snapshot(ws / "stage1")
    command = " ".join([sys.executable, "-m", "dmdl_cli", "pretrain-single", "--workspace", str(ws),
                        "--force", *set_args([*STAGE1_SETS, "stage1.lr=0.001"])])
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          env={**os.environ, "DMDL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 141, (proc.returncode, proc.stdout, proc.stderr)  # as SIGPIPE
    assert "Traceback" not in proc.stderr, proc.stderr
    run = json.loads((ws / "manifest.json").read_text())["runs"][-1]
    assert run["status"] == "interrupted" and "broken pipe" in run["error"], run  # was "1"
    assert snapshot(ws / "stage1") == before


def test_a_second_sigterm_stops_at_once_without_leaving_a_temporary_file(tmp_path):
    import subprocess
    import sys

    script = """
import os, signal, sys
from pathlib import Path
from dmdl_cli.atomic import atomic_output
from dmdl_cli.errors import Interrupted
from dmdl_cli.training.signals import StopRequest

out = Path(sys.argv[1]) / "last.pt"
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # the first: deferred to the end of the step
    assert stop.signum == signal.SIGTERM
    try:
        with atomic_output(out) as tmp:  # writing last.pt when the second one comes
            tmp.write_bytes(bytes(1 << 20))
            os.kill(os.getpid(), signal.SIGTERM)
            tmp.write_bytes(bytes(1 << 20))
    except Interrupted as err:
        print(err)
        sys.exit(err.exit_code)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 143, (proc.returncode, proc.stderr)  # was killed: -15
    assert "second SIGTERM" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no .last.pt.*.tmp (was 50 MB of it)


# -- prepare-data --force killed at any moment ------------------------------------------------


def _in_staging(path: Path) -> bool:
    return any(part.startswith(".prepare-") for part in path.parts)


# (where SIGKILL lands, what the next command does): os.replace calls of the run, in order
KILL_POINTS = {
    "building": ("before", lambda src, dst: dst.name == "cache-32x16.u8" and _in_staging(dst), "undid"),
    "journal-write": ("before", lambda src, dst: dst.name == ".prepare-swap.json", "undid"),
    "journal": ("after", lambda src, dst: dst.name == ".prepare-swap.json", "finished"),
    "old-data-aside": ("after", lambda src, dst: dst.name == "data" and dst.parent.name.startswith(
        ".retired-"), "finished"),
    "new-recipe": ("before", lambda src, dst: src.name == "recipe.yaml"
                   and src.parent.name.startswith(".prepare-"), "finished"),
    "ledger": ("after", lambda src, dst: dst.name == "manifest.json"
               and (dst.parent / ".prepare-swap.json").exists(), "finished"),
    "cleanup": ("rmtree", lambda path: Path(path).name.startswith(".retired-"), "removed"),
}


def _killed_prepare(args: list, when: str, where) -> None:
    """In a forked child: run ``dmdl ARGS`` and SIGKILL it at the point ``where`` names."""
    import shutil
    import signal

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if when == "rmtree":
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if where(path):
                die()
            return real_rmtree(path, *a, **k)

        shutil.rmtree = rmtree
    else:
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            hit = where(Path(src), Path(dst))
            if hit and when == "before":
                die()
            real_replace(src, dst, *a, **k)
            if hit and when == "after":
                die()

        os.replace = replace
    invoke(args)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_prepare_data_force_killed_at_any_moment_is_finished_or_undone_by_the_next_command(
        tiny_workspace, tmp_path, point):
    import json
    import multiprocessing

    from conftest import TINY_WORKSPACE_IDS

    ws = copy_workspace(tiny_workspace, tmp_path)
    (ws / "stage1").mkdir()
    (ws / "stage1" / "final.pt").write_bytes(b"a trained model")
    (ws / "labels").mkdir()
    (ws / "labels" / "stage1-e001.npz").write_bytes(b"labels")
    before = json.loads((ws / "manifest.json").read_text())["dataset"]
    args = ["prepare-data", "--dataset", "synthetic", "--ids", TINY_WORKSPACE_IDS, "--seed", "0",
            "--root", tiny_workspace.parent / "synthetic", "--workspace", ws, "--force",
            "--set", "data.height=32", "--set", "data.width=16", "--set", "run.workers=1"]
    when, where, outcome = KILL_POINTS[point]
    child = multiprocessing.get_context("fork").Process(target=_killed_prepare,
                                                        args=(args, when, where))
    child.start()
    child.join(300)
    assert child.exitcode == -9  # killed where asked

    result = invoke(["evaluate", "--workspace", ws, "--checkpoint", "imagenet", "--mode",
                     "all-search", "--trials", "1"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "prepare-data --force" in line]
    assert len(said) == 1 and outcome in said[0], result.output
    assert not [p.name for p in ws.iterdir() if p.name.startswith((".retired-", ".prepare-"))
                or p.name.endswith(".tmp")]
    manifest = json.loads((ws / "manifest.json").read_text())
    data = sorted(p.name for p in (ws / "data").iterdir())
    if outcome == "undid":  # the old workspace, as it was
        assert (ws / "stage1" / "final.pt").read_bytes() == b"a trained model"
        assert data == ["cache-64x32.u8", "cache-64x32.u8.json", "index.csv"]
        assert manifest["dataset"] == before and "height: 64" in (ws / "recipe.yaml").read_text()
        assert manifest["runs"][-2]["status"] == "interrupted"  # the killed prepare-data
    else:  # the new one, complete
        assert not (ws / "stage1").exists() and not (ws / "labels").exists()
        assert data == ["cache-32x16.u8", "cache-32x16.u8.json", "index.csv"]
        assert "height: 32" in (ws / "recipe.yaml").read_text()
        assert manifest["dataset"]["index_sha256"] == before["index_sha256"]  # same images
        killed = [r for r in manifest["runs"] if r["stage"] == "prepare-data"][-1]
        assert killed["status"] == "done" or outcome == "removed", killed


def test_force_regenerating_the_synthetic_set_in_the_workspace_swaps_it_in_whole(tmp_path):
    """The set under WS/synthetic that --force regenerates is built in the staging folder too:
    killed mid-swap, the next command finishes it and the index names images that exist."""
    import multiprocessing

    from dmdl_cli.data.index import read_index

    ws = tmp_path / "ws"
    small = ["--set", "synthetic.height=32", "--set", "synthetic.width=16", *TINY_SIZE]
    result = invoke(["prepare-data", "--dataset", "synthetic", "--workspace", ws, "--ids", "3", *small])
    assert result.exit_code == 0, result.output
    old_images = sorted((ws / "synthetic").rglob("*.jpg"))
    args = ["prepare-data", "--dataset", "synthetic", "--workspace", ws, "--ids", "6", "--force", *small]
    when, where, _ = KILL_POINTS["old-data-aside"]
    child = multiprocessing.get_context("fork").Process(target=_killed_prepare,
                                                        args=(args, when, where))
    child.start()
    child.join(300)
    assert child.exitcode == -9
    assert sorted((ws / "synthetic").rglob("*.jpg")) == old_images  # not yet swapped in
    result = invoke(["prepare-data", "--dataset", "synthetic", "--workspace", ws, "--ids", "6", *small])
    assert result.exit_code == 0, result.output
    assert "finished the swap" in result.output and "nothing to do" in result.output
    index = read_index(ws / "data" / "index.csv")
    assert len(index) == 2 * len(old_images)  # 6 identities instead of 3
    assert all(p.startswith(str(ws / "synthetic")) and os.path.isfile(p) for p in index.paths)


def test_onnx_export_on_a_full_disk_names_the_disk_not_the_opset(tiny_workspace, small_filesystem):
    pytest.importorskip("onnx")
    ws = copy_workspace(tiny_workspace, small_filesystem)  # 1.7 MiB of 4: no room for 45 MB
    result = invoke(["export", "--workspace", ws, "--checkpoint", "imagenet", "--format", "onnx"])
    line = assert_refused(result, f"cannot write {ws / 'export' / 'model.onnx'}", "No space left")
    assert "opset" not in line
    assert not list((ws / "export").iterdir())  # no temporary file fills the disk


def test_write_failure_finds_the_disk_error_inside_a_library_error():
    import errno

    from dmdl_cli.atomic import write_failure

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("serialising the graph failed") from inner
    except RuntimeError as outer:
        assert write_failure(outer).errno == errno.ENOSPC
    assert write_failure(RuntimeError("unsupported operator")) is None


def test_a_cache_half_written_by_a_killed_prepare_data_is_removed_by_the_next(tiny_workspace, tmp_path):
    import multiprocessing

    from conftest import TINY_WORKSPACE_IDS

    ws = tmp_path / "ws"
    args = ["prepare-data", "--dataset", "synthetic", "--ids", TINY_WORKSPACE_IDS, "--seed", "0",
            "--root", tiny_workspace.parent / "synthetic", "--workspace", ws, *TINY_SIZE]
    child = multiprocessing.get_context("fork").Process(
        target=_killed_prepare, args=(args, "before", lambda src, dst: dst.name == "cache-64x32.u8"))
    child.start()
    child.join(300)
    assert child.exitcode == -9
    assert [p.name.endswith(".tmp") for p in (ws / "data").iterdir()] == [True]  # 1.6 MiB of it
    result = invoke(args)
    assert result.exit_code == 0 and "removed 1 temporary files" in result.output, result.output
    assert not [p for p in ws.rglob("*.tmp")]
