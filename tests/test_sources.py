"""Readers of the raw layouts, the index csv, and the bad-image scan."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dmdl_cli.data.index import (
    INDEX_HEADER,
    INFRARED,
    VISIBLE,
    IndexTable,
    index_fingerprint,
    read_index,
    write_index,
)
from dmdl_cli.data.sources import find_bad_images, read_source
from dmdl_cli.data.synthetic import LLCM_NIR_CAMS, LLCM_VIS_CAMS, generate, split_ids
from dmdl_cli.errors import DmdlError

IDS = (3, 1, 2)  # train / val / test identities
SEED = 5


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("raw")
    out = {}
    for layout, n in (("sysu", 2), ("regdb", 2), ("llcm", 1)):
        generate(base / layout, ids=IDS, images_per_cam=n, layout=layout, seed=SEED)
        out[layout] = base / layout
    return out


def _copy(tree: Path, tmp_path: Path) -> Path:
    dst = tmp_path / tree.name
    shutil.copytree(tree, dst)
    return dst


# --------------------------------------------------------------------------------------------
# counts match the trees
# --------------------------------------------------------------------------------------------

def test_sysu_reader_counts(trees):
    splits = split_ids(IDS, SEED)
    for dataset in ("sysu", "synthetic"):
        t = read_source(dataset, trees["sysu"])
        assert len(t) == 6 * 6 * 2
        train, test = t.rows("train"), t.rows("test")
        assert set(t.pids[train]) == set(splits["train"] + splits["val"])
        assert set(t.pids[test]) == set(splits["test"])
        assert len(t.rows("train", VISIBLE)) == 4 * 4 * 2 and len(t.rows("train", INFRARED)) == 4 * 2 * 2
        assert len(t.rows("test", VISIBLE)) == 2 * 4 * 2 and len(t.rows("test", INFRARED)) == 2 * 2 * 2
        assert set(t.cams[t.modality == INFRARED]) == {3, 6}
        assert set(t.cams[t.modality == VISIBLE]) == {1, 2, 4, 5}
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in t.paths)
        assert all(f"/cam{c}/{pid:04d}/" in p for p, c, pid in zip(t.paths, t.cams, t.pids))
        assert str(trees["sysu"]) in t.paths[0]  # points into the raw tree


def test_regdb_reader_counts_and_trials(trees):
    t1 = read_source("regdb", trees["regdb"], trial=1)
    t2 = read_source("regdb", trees["regdb"], trial=2)
    for t in (t1, t2):
        assert len(t) == 6 * 2 * 2
        assert len(t.rows("train", VISIBLE)) == len(t.rows("test", INFRARED)) == 3 * 2
        assert set(t.cams[t.modality == VISIBLE]) == {1} and set(t.cams[t.modality == INFRARED]) == {2}
        assert not set(t.pids[t.rows("train")]) & set(t.pids[t.rows("test")])
        assert all("/Thermal/" in p for p in np.array(t.paths)[t.modality == INFRARED])
    assert set(t1.pids[t1.rows("train")]) != set(t2.pids[t2.rows("train")])
    for bad in (0, 11, "1"):
        with pytest.raises(DmdlError, match="trial"):
            read_source("regdb", trees["regdb"], trial=bad)


def test_llcm_reader_counts_and_cameras(trees):
    t = read_source("llcm", trees["llcm"])
    splits = split_ids(IDS, SEED)
    assert len(t) == 6 * (len(LLCM_VIS_CAMS) + len(LLCM_NIR_CAMS))
    assert len(t.rows("test", INFRARED)) == 2 * len(LLCM_NIR_CAMS)
    assert set(t.pids[t.rows("test")]) == set(splits["test"])
    assert set(t.cams[t.modality == VISIBLE]) == set(LLCM_VIS_CAMS)
    assert set(t.cams[t.modality == INFRARED]) == set(LLCM_NIR_CAMS)
    assert all(f"/cam{c}/" in p for p, c in zip(t.paths, t.cams))


def test_llcm_camera_from_file_name_tag(trees, tmp_path):
    root = _copy(trees["llcm"], tmp_path)
    lines = (root / "idx" / "test_vis.txt").read_text().split("\n")
    rel, label = lines[0].split()
    new_rel = f"flat/{Path(rel).stem}_c07_s1_vis.jpg"
    (root / "flat").mkdir()
    shutil.copy(root / rel, root / new_rel)
    (root / "idx" / "test_vis.txt").write_text("\n".join([f"{new_rel} {label}"] + lines[1:]))
    t = read_source("llcm", root)
    assert t.cams[t.paths.index(str(root / new_rel))] == 7


# --------------------------------------------------------------------------------------------
# bad input: one-line DmdlError with the expected words
# --------------------------------------------------------------------------------------------

def _one_line_error(fn, *words):
    with pytest.raises(DmdlError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_missing_root_and_unknown_dataset(tmp_path):
    _one_line_error(lambda: read_source("sysu", tmp_path / "nope"), "does not exist", "nope")
    _one_line_error(lambda: read_source("market", tmp_path), "unknown data set")


def test_wrong_layout(trees):
    _one_line_error(lambda: read_source("sysu", trees["regdb"]), "not the SYSU-MM01 layout",
                    "cam1..cam6", "exp/train_id.txt")
    _one_line_error(lambda: read_source("regdb", trees["sysu"]), "not the RegDB layout")
    _one_line_error(lambda: read_source("llcm", trees["sysu"]), "not the LLCM layout")


def test_sysu_missing_camera_and_id_files(trees, tmp_path):
    root = _copy(trees["sysu"], tmp_path)
    shutil.rmtree(root / "cam4")
    _one_line_error(lambda: read_source("sysu", root), "cam4")
    root = _copy(trees["sysu"], tmp_path / "b")
    (root / "exp" / "test_id.txt").unlink()
    _one_line_error(lambda: read_source("sysu", root), "test_id.txt", "missing")
    root = _copy(trees["sysu"], tmp_path / "c")
    (root / "exp" / "train_id.txt").write_text("\n")
    _one_line_error(lambda: read_source("sysu", root), "train_id.txt", "empty")
    (root / "exp" / "train_id.txt").write_text("1,x,3\n")
    _one_line_error(lambda: read_source("sysu", root), "train_id.txt", "'x'")


def test_sysu_ids_without_images(trees, tmp_path):
    root = _copy(trees["sysu"], tmp_path)
    test_ids = split_ids(IDS, SEED)["test"]
    extra = list(range(100, 115))
    (root / "exp" / "test_id.txt").write_text(",".join(map(str, test_ids + extra)) + "\n")
    msg = _one_line_error(lambda: read_source("sysu", root), "15 identities", "test_id.txt",
                          "0100", "0109", "and 5 more")
    assert "0110" not in msg
    train_id = split_ids(IDS, SEED)["train"][0]
    (root / "exp" / "test_id.txt").write_text(",".join(map(str, test_ids + [train_id])))
    _one_line_error(lambda: read_source("sysu", root), "also in")


def test_list_files_missing_empty_or_pointing_nowhere(trees, tmp_path):
    root = _copy(trees["regdb"], tmp_path)
    (root / "idx" / "test_thermal_3.txt").unlink()
    _one_line_error(lambda: read_source("regdb", root, trial=3), "test_thermal_3.txt", "missing")
    (root / "idx" / "train_visible_4.txt").write_text("")
    _one_line_error(lambda: read_source("regdb", root, trial=4), "train_visible_4.txt", "empty")
    lines = (root / "idx" / "train_thermal_5.txt").read_text().split("\n")
    (root / "idx" / "train_thermal_5.txt").write_text("\n".join(lines + ["Thermal/9999/0001.jpg 9"]))
    _one_line_error(lambda: read_source("regdb", root, trial=5), "train_thermal_5.txt",
                    "1 listed images do not exist", "Thermal/9999/0001.jpg")
    (root / "idx" / "train_thermal_6.txt").write_text("Thermal/0001/0001.jpg notanint\n")
    _one_line_error(lambda: read_source("regdb", root, trial=6), "train_thermal_6.txt:1", "label")

    root = _copy(trees["llcm"], tmp_path / "l")
    (root / "idx" / "train_nir.txt").write_text("train_nir/nocam/0001.jpg 1\n")
    (root / "train_nir" / "nocam").mkdir()
    (root / "train_nir" / "nocam" / "0001.jpg").write_bytes(b"x")
    _one_line_error(lambda: read_source("llcm", root), "train_nir.txt:1", "no camera")


# --------------------------------------------------------------------------------------------
# bad images
# --------------------------------------------------------------------------------------------

def test_find_bad_images(trees, tmp_path):
    good = sorted(str(p) for p in (trees["sysu"] / "cam1").rglob("*.jpg"))[:4]
    data = Path(good[0]).read_bytes()
    empty, trunc, text = tmp_path / "empty.jpg", tmp_path / "trunc.jpg", tmp_path / "text.jpg"
    empty.write_bytes(b"")
    trunc.write_bytes(data[: len(data) // 2])
    text.write_text("this is not an image\n")
    paths = [good[0], str(empty), good[1], str(trunc), str(text), good[2], str(tmp_path / "gone.jpg")]
    for workers in (1, 3):
        bad = find_bad_images(paths, workers=workers)
        assert [p for p, _ in bad] == [str(empty), str(trunc), str(text), str(tmp_path / "gone.jpg")]
        reasons = dict(bad)
        assert "empty" in reasons[str(empty)]
        assert "truncated" in reasons[str(trunc)]
        assert "not an image" in reasons[str(text)]
    assert find_bad_images(good, workers=2) == []
    assert find_bad_images([], workers=2) == []


# --------------------------------------------------------------------------------------------
# index csv
# --------------------------------------------------------------------------------------------

def _table() -> IndexTable:
    return IndexTable(
        paths=["/data/a.jpg", "/data/with,comma.jpg", "/data/c.jpg"],
        pids=[3, -1, 7], cams=[1, 3, 6], modality=[VISIBLE, INFRARED, INFRARED],
        split=["train", "train", "test"],
    )


def test_index_round_trip_and_header(tmp_path, trees):
    t = _table()
    write_index(t, tmp_path / "index.csv")
    text = (tmp_path / "index.csv").read_text()
    assert text.split("\n")[0] == INDEX_HEADER == "path,pid,cam,modality,split"
    assert text.split("\n")[1] == "/data/a.jpg,3,1,visible,train"
    assert text.split("\n")[3] == "/data/c.jpg,7,6,infrared,test"
    back = read_index(tmp_path / "index.csv")
    assert back.paths == t.paths
    for col in ("pids", "cams", "modality", "split"):
        assert np.array_equal(getattr(back, col), getattr(t, col))
    assert back.pids.dtype == np.int64 and back.modality.dtype == np.int8
    assert index_fingerprint(back) == index_fingerprint(t)
    assert index_fingerprint(t.select([0, 1])) != index_fingerprint(t)

    real = read_source("sysu", trees["sysu"])
    write_index(real, tmp_path / "real.csv")
    again = read_index(tmp_path / "real.csv")
    assert index_fingerprint(again) == index_fingerprint(real)
    assert np.array_equal(again.split, real.split)


def test_index_select_and_rows():
    t = _table()
    assert t.rows().tolist() == [0, 1, 2]
    assert t.rows(split="train").tolist() == [0, 1]
    assert t.rows(modality=INFRARED).tolist() == [1, 2]
    assert t.rows("test", INFRARED).dtype == np.int64
    sub = t.select(t.modality == INFRARED)
    assert len(sub) == 2 and sub.paths == t.paths[1:] and sub.cams.tolist() == [3, 6]
    assert t.select(np.array([2, 0])).pids.tolist() == [7, 3]
    with pytest.raises(ValueError):
        IndexTable(["a"], [1, 2], [1], [0], ["train"])


@pytest.mark.parametrize(
    "content, words",
    [
        ("path,pid,cam,split\n", [":1:", "header"]),
        ("", [":1:", "header"]),
        (INDEX_HEADER + "\n/a.jpg,1,1,visible\n", [":2:", "5 fields"]),
        (INDEX_HEADER + "\n/a.jpg,1,1,visible,train\n/b.jpg,x,1,visible,train\n", [":3:", "integers"]),
        (INDEX_HEADER + "\n/a.jpg,1,1,thermal,train\n", [":2:", "visible/infrared"]),
        (INDEX_HEADER + "\n/a.jpg,1,1,visible,val\n", [":2:", "train/test"]),
        (INDEX_HEADER + "\n/a.jpg,-2,1,visible,train\n", [":2:", ">= -1"]),
    ],
)
def test_read_index_rejects_corruption(tmp_path, content, words):
    path = tmp_path / "index.csv"
    path.write_text(content)
    msg = _one_line_error(lambda: read_index(path), str(path), "prepare-data", *words)
    assert msg


def test_read_index_missing(tmp_path):
    _one_line_error(lambda: read_index(tmp_path / "none.csv"), "none.csv", "dmdl prepare-data")


def test_read_index_malformed_csv(tmp_path):
    path = tmp_path / "index.csv"
    path.write_bytes((INDEX_HEADER + "\n/a.jpg,1,1,visible,train\n\"/b.jpg\0,1,1,visible,train\n").encode())
    _one_line_error(lambda: read_index(path), "index.csv", "prepare-data")
