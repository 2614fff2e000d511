"""The command line as a user meets it: choices listed in --help, a bad choice refused cleanly,
--overlay wherever --recipe is taken, and where results went."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from conftest import REPO, assert_refused, copy_workspace, invoke, linked_workspace
from dmdl_cli.cli import app
from dmdl_cli.datasets import DATA_SETS
from dmdl_cli.recipe import CLUSTER_MODALITIES, EXPORT_FORMATS
from dmdl_cli.stages import STAGES

ALL_MODES = ["all", *dict.fromkeys(m for record in DATA_SETS.values() for m in record.modes)]
CHOICES = [
    ("prepare-data", "--dataset", list(DATA_SETS)),
    ("evaluate", "--mode", ALL_MODES),
    ("export", "--format", list(EXPORT_FORMATS)),
    ("cluster", "--modality", list(CLUSTER_MODALITIES)),
]


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(("command", "option", "choices"), CHOICES)
def test_help_lists_the_choices(command, option, choices):
    line = next(x for x in _help(command).splitlines() if option in x)
    assert f"<{'|'.join(choices)}>" in line, line


@pytest.mark.parametrize(("command", "option", "choices"), CHOICES)
def test_a_bad_choice_is_one_clean_usage_error(command, option, choices, tmp_path):
    result = invoke([command, option, "nope", "-w", tmp_path / "ws"])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert "'nope' is not one of" in result.output and choices[0] in result.output
    assert "Value error" not in result.output  # no validation library's wording
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("command", ["prepare-data", "cluster", "pretrain-single", "train-cross",
                                     "evaluate", "export", "report"])
def test_help_placeholders_say_what_to_type_not_python_types(command):
    text = _help(command)
    assert re.search(r"<(list\[|int>|str>|path>|float>)", text) is None, text
    if command != "report":
        assert "--set KEY=VALUE" in text and "--overlay FILE" in text and "-w, --workspace DIR" in text


def test_prepare_data_recipe_help_names_the_default_of_a_new_workspace():
    line = " ".join(_help("prepare-data").split())
    assert "recipes/<dataset>.yaml, recipes/demo.yaml for synthetic" in line


# Checking options, the workspace and the recipe must not import torch (seconds): a bad option,
# key or value is answered at once. Each check runs in a fresh interpreter.
NO_TORCH = """
import sys
from typer.testing import CliRunner
import dmdl_cli.cli
assert "torch" not in sys.modules, "importing dmdl_cli.cli imported torch"
args = sys.argv[1:]
if args:
    result = CliRunner().invoke(dmdl_cli.cli.app, args)
    print(result.output)
    assert result.exit_code != 0, result.output
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH")
"""


def _fresh_python(script: str, *args) -> str:
    """The output of ``script`` run with ``args`` in a fresh interpreter (which must succeed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DMDL_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _no_torch(*args) -> str:
    return _fresh_python(NO_TORCH, *args)


def test_importing_the_cli_imports_no_torch():
    assert _no_torch().strip().endswith("NO_TORCH")


def test_bad_options_keys_and_values_are_answered_before_torch_is_imported(tiny_workspace, tmp_path):
    ws = copy_workspace(tiny_workspace, tmp_path)
    for args in (["prepare-data", "--dataset", "synthetic", "--workspace", tmp_path / "new",
                  "--set", "stage1.bogus=1"],
                 ["pretrain-single", "--workspace", ws, "--set", "stage1.lr=fast"],
                 ["train-cross", "--workspace", ws, "--set", "stage2.epochs=0"],
                 ["evaluate", "--workspace", ws, "--mode", "nope"],
                 ["evaluate", "--workspace", ws, "--set", "eval.trials=0"],
                 ["cluster", "--workspace", tmp_path / "missing"]):
        output = _no_torch(*args)
        assert output.strip().endswith("NO_TORCH"), (args, output)
        assert len([line for line in output.splitlines()
                    if line.startswith(("error:", "Error:"))]) == 1, (args, output)
    assert not (tmp_path / "new").exists()


# A whole run of a stage that runs no network (StageSpec.device false: prepare-data, select) imports
# no torch: `python -m dmdl_cli ARGS` in a fresh interpreter says at exit whether torch was loaded.
RUN_TO_EXIT = """
import atexit, runpy, sys
atexit.register(lambda: print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH"))
sys.argv = ["dmdl", *sys.argv[1:]]
runpy.run_module("dmdl_cli", run_name="__main__")
"""


def _run_to_exit(*args) -> str:
    return _fresh_python(RUN_TO_EXIT, *args)


def test_a_whole_prepare_data_run_imports_no_torch(tmp_path):
    ws = tmp_path / "ws"
    output = _run_to_exit("prepare-data", "--dataset", "synthetic", "--ids", "4", "--workspace", ws,
                          "--set", "run.workers=1")
    assert output.strip().endswith("NO_TORCH"), output
    assert f"results: workspace {ws.resolve()}" in " ".join(output.split())
    assert (ws / "data" / "index.csv").is_file() and list((ws / "data").glob("cache-*.u8"))


def test_a_whole_select_run_imports_no_torch(trained_tiny, tmp_path):
    ws = linked_workspace(trained_tiny, tmp_path / "ws")
    output = _run_to_exit("select", "--workspace", ws, "--stage", "both")
    assert output.strip().endswith("NO_TORCH"), output
    assert (ws / "stage1" / "selected.pt").is_file() and (ws / "stage2" / "selected.pt").is_file()


def test_exactly_the_stages_that_run_a_network_get_a_device():
    with_device = {spec.command for spec in STAGES.values() if spec.device}
    assert with_device == {"pretrain-single", "train-cross", "cluster", "evaluate", "export"}


def test_errors_name_the_options_typed_not_the_keys_they_imply(tmp_path):
    result = invoke(["prepare-data", "--dataset", "synthetic", "--workspace", tmp_path / "ws",
                     "--ids", "9", "--set", "stage1.triplet_ramp=[[1]]"])
    line = assert_refused(result, "stage1.triplet_ramp", "--dataset synthetic", "--ids 9",
                          "--set stage1.triplet_ramp=[[1]]")
    assert "data.trial" not in line and "data.dataset" not in line, line


def test_every_command_that_takes_a_recipe_takes_overlays():
    group = typer.main.get_command(app)
    with_recipe = []
    for name, command in group.commands.items():
        options = {opt for param in command.params for opt in param.opts}
        if "--recipe" in options:
            with_recipe.append(name)
            assert "--overlay" in options, name
    assert {"prepare-data", "cluster", "pretrain-single", "train-cross", "evaluate",
            "export"} <= set(with_recipe)


def test_small_gallery_warning_and_closing_line(tiny_workspace, tmp_path):
    ws = copy_workspace(tiny_workspace, tmp_path)
    result = invoke(["evaluate", "-w", ws, "--mode", "all-search", "--checkpoint", "imagenet",
                     "--trials", "1"])
    assert result.exit_code == 0, result.output
    # the tiny set has 3 test identities: Rank-5 and beyond say little
    assert "warning: the all-search gallery holds 3 identities, fewer than Rank-20" in result.output
    out = ws.resolve() / "eval" / "all-search-random-init.json"
    assert f"wrote {out}" in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"results: {ws.resolve() / 'eval'}")
