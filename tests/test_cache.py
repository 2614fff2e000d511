"""The memory-mapped image cache."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dmdl_cli.data.cache import (
    SAMPLE_ROWS,
    CacheDamaged,
    ImageCache,
    build_cache,
    load_image,
    open_cache,
    read_rows,
    record_path,
    verify_cache,
)
from dmdl_cli.errors import DmdlError
from dmdl_cli.workspace import Workspace


@pytest.fixture()
def images(tmp_path):
    """Four images of different sizes and modes (RGB jpg, grey png, RGBA png, exact size)."""
    rng = np.random.default_rng(0)
    paths = []
    specs = [((70, 40, 3), "RGB", "a.jpg"), ((50, 30), "L", "b.png"),
             ((90, 44, 4), "RGBA", "c.png"), ((24, 12, 3), "RGB", "d.png")]
    for shape, mode, name in specs:
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(arr, mode=mode).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_cache_name(tmp_path):
    assert Workspace(tmp_path).cache_path(288, 144) == tmp_path / "data" / "cache-288x144.u8"


def test_rows_equal_decoded_and_resized_images(tmp_path, images):
    out = Workspace(tmp_path / "ws").cache_path(24, 12)
    cache = build_cache(images, out, 24, 12, workers=2, progress=False)
    assert isinstance(cache, ImageCache) and cache.shape == (4, 24, 12, 3) and cache.dtype == np.uint8
    assert os.path.getsize(out) == 4 * 24 * 12 * 3
    for i, path in enumerate(images):
        with Image.open(path) as img:
            expected = np.asarray(img.convert("RGB").resize((12, 24), Image.BILINEAR))
        assert np.array_equal(cache[i], expected)
        assert np.array_equal(cache[i], load_image(path, 24, 12))
    grey = cache[1]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    with pytest.raises(TypeError):
        cache[0] = 1  # read-only
    again = open_cache(out, 4, 24, 12)
    assert np.array_equal(np.asarray(again), np.asarray(cache))
    # no temporary left; the integrity record sits beside the cache
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".json"]


def test_single_worker_gives_the_same_bytes(tmp_path, images):
    a = build_cache(images, tmp_path / "a.u8", 16, 8, workers=1, progress=False)
    b = build_cache(images * 40, tmp_path / "b.u8", 16, 8, workers=3, progress=True)
    assert np.array_equal(np.asarray(b[:4]), np.asarray(a))
    assert np.array_equal(np.asarray(b[-4:]), np.asarray(a))


def test_open_cache_mismatch_names_the_fix(tmp_path, images):
    out = tmp_path / "c.u8"
    build_cache(images, out, 16, 8, progress=False)
    # a plain re-run of prepare-data rebuilds a damaged cache: the message does not ask for --force
    with pytest.raises(DmdlError, match=r"c\.u8.*dmdl prepare-data.*no --force needed"):
        open_cache(out, 5, 16, 8)
    with pytest.raises(DmdlError, match="prepare-data.*no --force needed"):
        open_cache(out, 4, 16, 16)
    with pytest.raises(DmdlError, match=r"missing.*dmdl prepare-data"):
        open_cache(tmp_path / "none.u8", 4, 16, 8)


def test_undecodable_image_leaves_no_cache(tmp_path, images):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "cache" / "x.u8"
    with pytest.raises(DmdlError, match=r"bad\.jpg.*skip-bad-images"):
        build_cache(images + [str(bad)] + images, out, 16, 8, workers=2, progress=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
    with pytest.raises(DmdlError, match="no images"):
        build_cache([], out, 16, 8, progress=False)


def test_read_rows_keeps_the_requested_order_with_repeats():
    cache = np.arange(6 * 2 * 1 * 3, dtype=np.uint8).reshape(6, 2, 1, 3)  # (N, H, W, 3)
    rows = np.array([4, 0, 5, 0, 2])
    out = read_rows(cache, rows)
    assert out.shape == (5, 2, 1, 3) and out.dtype == np.uint8
    for i, r in enumerate(rows):
        assert np.array_equal(out[i], cache[r])
    assert read_rows(cache, np.array([], dtype=np.int64)).shape == (0, 2, 1, 3)


def test_every_row_read_is_checked_against_its_checksum(tmp_path, images):
    """Rows the check on opening does not sample: opening succeeds, reading any of them (alone,
    in a batch, in a slice) is refused naming the row; the other rows read fine."""
    out = tmp_path / "z.u8"
    build_cache(images * 100, out, 16, 8, progress=False)  # 400 rows, 256 sampled on opening
    record = json.loads(record_path(out).read_text())
    assert record["row_checksum"] == "crc32" and len(record["row_checksums"]) == 400 * 8
    assert verify_cache(out, 400, 16, 8)[0]
    sampled = set(np.linspace(0, 399, SAMPLE_ROWS).round().astype(int))
    damaged = [r for r in range(30, 60) if r not in sampled][:2]
    row = 16 * 8 * 3
    with open(out, "r+b") as handle:  # same size, two rows zeroed
        for r in damaged:
            handle.seek(r * row)
            handle.write(bytes(row))
    cache = open_cache(out, 400, 16, 8)
    first = damaged[0]
    for read in (lambda: cache[first], lambda: cache[np.array([2, first, 70])],
                 lambda: cache[first - 1:first + 1], lambda: read_rows(cache, np.array([79, first]))):
        with pytest.raises(CacheDamaged, match=rf"z\.u8: row {first}\b.*does not match its "
                                                r"checksum.*no --force needed"):
            read()
    assert read_rows(cache, np.array([1, 29, 61, 399])).shape == (4, 16, 8, 3)
    assert cache.read_summary()["rows_read"] == 4  # the rows that matched, nothing else
    assert verify_cache(out, 400, 16, 8)[0] is False  # the full sha256 check sees it too
    with open(out, "r+b") as handle:  # a zeroed stretch of sampled rows: refused on opening
        handle.seek(100 * row)
        handle.write(bytes(10 * row))
    with pytest.raises(CacheDamaged, match=r"z\.u8: row 10\d"):
        open_cache(out, 400, 16, 8)
    record_path(out).unlink()
    with pytest.raises(DmdlError, match="no integrity record"):
        open_cache(out, 400, 16, 8)


def test_the_resize_filter_is_the_recipe_s_and_the_record_names_it(tmp_path, images):
    bicubic = build_cache(images, tmp_path / "bicubic.u8", 24, 12, workers=1, progress=False,
                          resize="bicubic")
    bilinear = build_cache(images, tmp_path / "bilinear.u8", 24, 12, workers=1, progress=False)
    for i, path in enumerate(images):
        with Image.open(path) as img:
            want = np.asarray(img.convert("RGB").resize((12, 24), Image.BICUBIC), dtype=np.uint8)
        assert np.array_equal(bicubic[i], want)
    # the images of another size differ between the filters; the one already 24x12 does not
    assert not np.array_equal(bicubic[0], bilinear[0]) and np.array_equal(bicubic[3], bilinear[3])
    assert json.loads(record_path(tmp_path / "bicubic.u8").read_text())["resize"] == "bicubic"
    assert open_cache(tmp_path / "bicubic.u8", 4, 24, 12, resize="bicubic").shape == (4, 24, 12, 3)
    with pytest.raises(DmdlError, match=r"resized bilinear but the recipe asks data.resize bicubic: "
                                        r"re-run `dmdl prepare-data`"):
        open_cache(tmp_path / "bilinear.u8", 4, 24, 12, resize="bicubic")
    # a record of an older dmdl has no "resize": its cache was bilinear
    record = json.loads(record_path(tmp_path / "bilinear.u8").read_text())
    del record["resize"]
    record_path(tmp_path / "bilinear.u8").write_text(json.dumps(record))
    assert open_cache(tmp_path / "bilinear.u8", 4, 24, 12, resize="bilinear").shape == (4, 24, 12, 3)
    with pytest.raises(DmdlError, match="resized bilinear"):
        open_cache(tmp_path / "bilinear.u8", 4, 24, 12, resize="bicubic")
