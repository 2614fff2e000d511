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
