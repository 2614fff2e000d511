"""The README's short try, run exactly as the README prints it.

The commands are read from the first ``sh`` block under "## Try a short schedule first", so
this test breaks when the README's commands stop working. Each line runs as a subprocess in a
scratch folder (``runs/try`` lands there), ``dmdl`` standing for ``python -m dmdl_cli`` of this
checkout; both stages must train and each command must name the epoch thresholds its shortened
schedule never reaches in one warning line, and nothing else.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from dmdl_cli.recipe import load_recipe, unreached_thresholds

SECTION = "## Try a short schedule first"


def readme_short_try() -> list[list[str]]:
    """The command lines of the section's first ``sh`` block, split as a shell would."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, f"no ```sh block under {SECTION!r}"
    return [shlex.split(line) for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _run(argv: list[str], cwd: Path) -> str:
    assert argv[0] == "dmdl", argv
    # torch's threads as a user gets them (OMP_NUM_THREADS when set): no figure is asserted
    env = {**os.environ, "PYTHONPATH": str(REPO), "DMDL_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "dmdl_cli", *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{output}"
    assert "Traceback" not in output and "error:" not in output, output
    return output


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning:")]


def test_the_readme_short_try_trains_both_stages_as_printed(tmp_path):
    commands = readme_short_try()
    names = [argv[1] for argv in commands]
    assert names[:3] == ["prepare-data", "pretrain-single", "train-cross"], names
    outputs = [_run(argv, tmp_path) for argv in commands]

    ws = tmp_path / commands[0][commands[0].index("--workspace") + 1]
    recipe = load_recipe(ws / "recipe.yaml")
    assert recipe.stage1.epochs == recipe.stage2.epochs == 1
    # the shortened schedule leaves thresholds unreached: each command that trains (or sets the
    # workspace's recipe) names its own in one line, each key once; the others say nothing
    own = {"prepare-data": None, "pretrain-single": ["stage1"], "train-cross": ["stage2"]}
    for name, output in zip(names, outputs):
        schedule = [line for line in _warnings(output) if "never reaches" in line]
        if name not in own:
            assert schedule == [], (name, schedule)
            continue
        assert len(schedule) == 1, (name, output)
        for key in unreached_thresholds(recipe, own[name]):
            assert schedule[0].count(key) == 1, (name, key, schedule[0])
    assert any(k.startswith("stage1.") for k in unreached_thresholds(recipe))
    assert any(k.startswith("stage2.") for k in unreached_thresholds(recipe))

    # both stages trained to their end, with every step of their one epoch
    manifest = json.loads((ws / "manifest.json").read_text())
    done = {run["stage"]: run["status"] for run in manifest["runs"]}
    assert done["pretrain-single"] == done["train-cross"] == "done", done
    for stage, iters in (("stage1", recipe.stage1.iters), ("stage2", recipe.stage2.iters)):
        assert (ws / stage / "final.pt").is_file()
        records = [json.loads(line) for line in (ws / stage / "log.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if r.get("kind") == "step"]
        assert max(steps) == iters == 10 and records[-1]["kind"] == "end", (stage, steps)
    if "evaluate" in names:
        evaluated = sorted((ws / "eval").glob("*-stage2-final.json"))
        assert evaluated, list((ws / "eval").iterdir())
        mean = json.loads(evaluated[0].read_text())["mean"]
        assert 0 < mean["mAP"] <= 1
