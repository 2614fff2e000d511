"""The command runner through the CLI: every stage command is in the ledger with what it read and
wrote; per-stage locks let evaluate run while stage 2 trains and keep prepare-data alone; the
ledger survives concurrent writers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import (STAGE1_SETS, STAGE2_SETS, assert_refused, copy_workspace, discard_when_done,
                      invoke, linked_workspace, set_args, tree_snapshot)
from dmdl_cli.atomic import atomic_write_bytes
from dmdl_cli.recipe import Recipe
from dmdl_cli.workspace import Workspace, WorkspaceLock

REPO = Path(__file__).resolve().parent.parent


def _ok(args: list) -> None:
    result = invoke(args)
    assert result.exit_code == 0, result.output


def _runs(ws: Path) -> list[dict]:
    return json.loads((ws / "manifest.json").read_text())["runs"]


@pytest.fixture(scope="module")
def pipeline(trained_tiny, tmp_path_factory, request) -> Path:
    """The tiny workspace through all six commands: the session's trained workspace (linked)
    after cluster, evaluate and export."""
    ws = linked_workspace(trained_tiny, tmp_path_factory.mktemp("runner") / "ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMDL_NO_PROGRESS", "1")
        _ok(["cluster", "-w", ws, "--modality", "visible"])
        _ok(["evaluate", "-w", ws, "--checkpoint", ws / "stage1" / "final.pt", "--mode", "all-search"])
        _ok(["export", "-w", ws, "--format", "torchscript"])
    yield ws
    discard_when_done(request, ws.parent)


def test_every_command_leaves_a_done_entry_with_its_inputs_and_outputs(pipeline):
    runs = _runs(pipeline)
    assert [r["stage"] for r in runs] == ["prepare-data", "pretrain-single", "train-cross",
                                         "cluster", "evaluate", "export"]
    assert all(r["status"] == "done" for r in runs)
    assert len({r["id"] for r in runs}) == len(runs)  # every entry has its own id
    inputs = [{i["path"] for i in r["inputs"]} for r in runs]
    outputs = [{o["path"] for o in r["outputs"]} for r in runs]
    index, cache = "data/index.csv", "data/cache-64x32.u8"
    assert {index, cache} <= outputs[0]  # prepare-data reads only the raw set, outside WS
    assert "stage1/final.pt" in outputs[1] and "stage2/final.pt" in outputs[2]
    assert "stage1/final.pt" in inputs[2]
    # cluster: the default checkpoint (stage 2's result), the label file and its recipe
    assert inputs[3] == {index, cache, "stage2/final.pt"}
    assert outputs[3] - _features(outputs[3]) == {"labels/cluster-stage2-final.npz",
                                                  "labels/cluster-stage2-final.recipe.yaml"}
    assert len(_features(outputs[3])) == 1  # the train features it made (or read: an input)
    assert runs[3]["info"]["checkpoint"] == "stage2-final" and runs[3]["info"]["modality"] == "visible"
    # evaluate: the checkpoint asked for, its sha256 the bytes evaluated
    assert inputs[4] == {index, cache, "stage1/final.pt"}
    assert outputs[4] - _features(outputs[4]) == {"eval/all-search-stage1-final.json"}
    evaluated = json.loads((pipeline / "eval" / "all-search-stage1-final.json").read_text())
    checkpoint = next(i for i in runs[4]["inputs"] if i["path"] == "stage1/final.pt")
    assert checkpoint["sha256"] == evaluated["checkpoint"]["sha256"]
    assert inputs[5] == {index, cache, "stage2/final.pt"}
    assert outputs[5] == {"export/model.ts", "export/preprocess.json"}
    assert runs[5]["info"]["format"] == "torchscript"
    # each record's sha256 is the file's (the cache's from its integrity record), and the
    # cache's says which rows the command read, each checked against its checksum
    record = json.loads((pipeline / "data" / "cache-64x32.u8.json").read_text())
    cache_read = next(i for i in runs[3]["inputs"] if i["path"] == cache)
    assert cache_read["sha256"] == record["sha256"] and cache_read["rows_read"] > 0


def _features(paths: set[str]) -> set[str]:
    return {p for p in paths if p.startswith("features/")}


def _hold(ws: Path, folder: str, title: str) -> list[WorkspaceLock]:
    """Take what a running stage command holds: WS/.lock shared, its own lock exclusively
    (another open file: flock conflicts even within this process)."""
    locks = [WorkspaceLock(ws / ".lock", shared=True),
             WorkspaceLock(ws / f".lock-{folder}", holder=title)]
    for lock in locks:
        lock.acquire()
    return locks


def test_evaluate_runs_while_stage2_trains_but_a_second_train_cross_does_not(pipeline, tmp_path):
    ws = linked_workspace(pipeline, tmp_path / "ws")
    held = _hold(ws, "stage2", "stage 2 (train-cross)")
    try:
        result = invoke(["evaluate", "-w", ws, "--checkpoint", ws / "stage1" / "final.pt",
                         "--mode", "all-search", "--rerank"])
        assert result.exit_code == 0, result.output
        assert _runs(ws)[-1]["stage"] == "evaluate" and _runs(ws)[-1]["status"] == "done"
        before = tree_snapshot(ws)
        result = invoke(["train-cross", "-w", ws, "--force", *set_args(STAGE2_SETS)])
        assert_refused(result, f"workspace {ws}", "in use by another dmdl process",
                       f"(pid {os.getpid()}) running stage 2 (train-cross)")
        assert tree_snapshot(ws) == before
    finally:
        for lock in reversed(held):
            lock.release()


def test_stage1_cannot_be_replaced_under_a_running_train_cross(pipeline, tmp_path):
    """train-cross holds stage 1's lock shared while it trains from stage1/final.pt: a
    `pretrain-single --force` meanwhile is refused naming it, and goes through afterwards."""
    from dmdl_cli.stages import stage_spec

    ws = linked_workspace(pipeline, tmp_path / "ws")
    before = tree_snapshot(ws)
    with Workspace.open(ws).locked(stage_spec("train-cross")):
        result = invoke(["pretrain-single", "-w", ws, "--force", *set_args(STAGE1_SETS)])
        assert_refused(result, "in use by another dmdl process", "reads this stage's results",
                       f"pid {os.getpid()} running stage 2 (train-cross)")
        assert tree_snapshot(ws) == before
        # evaluate of the stage-1 model is a reader too: it runs
        assert invoke(["evaluate", "-w", ws, "--checkpoint", ws / "stage1" / "final.pt",
                       "--mode", "all-search"]).exit_code == 0


def test_evaluates_run_side_by_side_but_keep_prepare_data_out(pipeline, tmp_path):
    """A running evaluate holds the workspace and the eval lock shared: a second evaluate (of
    another checkpoint, as a script evaluating every epoch model at once does) runs beside it;
    prepare-data is refused."""
    from dmdl_cli.stages import stage_spec

    ws = linked_workspace(pipeline, tmp_path / "ws")
    with Workspace.open(ws).locked(stage_spec("evaluate")):
        result = invoke(["evaluate", "-w", ws, "--checkpoint", ws / "stage2" / "final.pt",
                         "--mode", "all-search"])
        assert result.exit_code == 0, result.output
        root = Workspace.open(ws).dataset["root"]
        refused = invoke(["prepare-data", "--dataset", "synthetic", "--ids", "9", "--root", root,
                          "-w", ws, "--force"])
        assert_refused(refused, "in use by another dmdl process", "evaluate or cluster")


def test_prepare_data_is_refused_while_any_stage_runs(tiny_workspace, tmp_path):
    ws = copy_workspace(tiny_workspace, tmp_path)
    root = Workspace.open(ws).dataset["root"]
    args = ["prepare-data", "--dataset", "synthetic", "--ids", "9", "--root", root, "-w", ws]
    before = tree_snapshot(ws)
    for folder, title in (("eval", "evaluate"), ("stage1", "stage 1 (pretrain-single)")):
        held = _hold(ws, folder, title)
        try:
            result = invoke(args)
        finally:
            for lock in reversed(held):
                lock.release()
        assert_refused(result, "in use by another dmdl process", f"(pid {os.getpid()}) running {title}")
        assert tree_snapshot(ws) == before
    # and the other way round: a stage command is refused while prepare-data rewrites the data
    holder = WorkspaceLock(ws / ".lock", holder="prepare-data")
    holder.acquire()
    try:
        result = invoke(["evaluate", "-w", ws, "--checkpoint", "imagenet"])
    finally:
        holder.release()
    assert_refused(result, f"(pid {os.getpid()}) running prepare-data")
    assert invoke(args).exit_code == 0  # free again: the kernel's locks hold nothing stale


# --------------------------------------------------------------------------------------------
# the ledger under concurrent writers
# --------------------------------------------------------------------------------------------

def test_interleaved_ledger_writes_keep_every_entry(tiny_workspace, tmp_path):
    ws_dir = copy_workspace(tiny_workspace, tmp_path)
    before = _runs(ws_dir)
    a, b = Workspace.open(ws_dir), Workspace.open(ws_dir)
    out = ws_dir / "eval" / "x.json"
    with a.stage_run("evaluate", Recipe()) as run_a, b.stage_run("cluster", Recipe()) as run_b:
        run_a.set(step=1)
        run_b.set(step=1)  # b did not see a's entry when it opened: it must not drop it
        atomic_write_bytes(out, b"{}")
        run_a.add_output(out)
        b.manifest["dataset"] = None  # only the holder of the whole workspace changes it
        run_b.set(step=2)
    runs = _runs(ws_dir)
    assert runs[:len(before)] == before
    mine = {r["stage"]: r for r in runs[len(before):]}
    assert set(mine) == {"evaluate", "cluster"} and len(runs) == len(before) + 2
    assert mine["evaluate"]["outputs"][0]["path"] == "eval/x.json"
    assert mine["cluster"]["info"] == {"step": 2}
    assert all(r["status"] == "done" for r in mine.values())
    assert Workspace.open(ws_dir).dataset is not None


def test_two_processes_writing_the_ledger_at_once_lose_no_entry(tiny_workspace, tmp_path):
    ws_dir = copy_workspace(tiny_workspace, tmp_path)
    count = 60
    code = textwrap.dedent(f"""
        import sys
        from dmdl_cli.recipe import Recipe
        from dmdl_cli.workspace import Workspace
        ws = Workspace.open({str(ws_dir)!r})
        print("ready", flush=True)
        sys.stdin.readline()  # both start writing together
        for i in range({count}):
            with ws.stage_run("evaluate", Recipe(), writer=sys.argv[1]) as run:
                run.set(i=i)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", code, name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for name in "ab"]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.wait(timeout=120) == 0
        proc.stdin.close()
        proc.stdout.close()
    runs = [r for r in _runs(ws_dir) if r["stage"] == "evaluate"]
    assert len(runs) == 2 * count and len({r["id"] for r in runs}) == 2 * count
    for name in "ab":
        mine = [r["info"]["i"] for r in runs if r["info"]["writer"] == name]
        assert mine == list(range(count))
    assert all(r["status"] == "done" for r in runs)
