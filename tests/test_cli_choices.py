"""The command line as a user meets it: choices listed in --help, a bad choice refused cleanly,
--overlay wherever --recipe is taken, and where results went."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from conftest import copy_workspace, invoke
from dmdl_cli.cli import app
from dmdl_cli.datasets import DATA_SETS
from dmdl_cli.recipe import CLUSTER_MODALITIES, EXPORT_FORMATS

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
    assert not (tmp_path / "ws").exists()


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
