"""The table of data sets (dmdl_cli/datasets.py): every record is complete and consistent with
the reader, recipe and protocol it names, and every part of dmdl reads its names from it."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from dmdl_cli.datasets import DATA_SETS, DATASET_NAMES, PROTOCOL_KINDS, dataset_record
from dmdl_cli.errors import DmdlError
from dmdl_cli.evaluation import protocols
from dmdl_cli.recipe import DataRecipe, load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_each_record_names_a_reader_a_recipe_and_a_protocol_that_exist(name):
    record = dataset_record(name)
    module, _, function = record.reader.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    recipe = load_recipe(REPO / "recipes" / record.recipe)
    assert recipe.data.dataset == name  # the default recipe is the data set's own
    assert record.protocol in PROTOCOL_KINDS and set(PROTOCOL_KINDS) == set(protocols._PROTOCOLS)
    assert record.modes and protocols.protocol_modes(name) == record.modes
    if record.protocol == "sysu":  # a gallery camera group per mode
        assert tuple(record.gallery_cameras) == record.modes


def test_an_unknown_name_is_one_error_wherever_it_is_met(tmp_path):
    for call in (lambda: dataset_record("market"), lambda: protocols.protocol_modes("market"),
                 lambda: protocols.build_trials("market", "all-search", pids=[], cams=[], modality=[])):
        with pytest.raises(DmdlError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "'market'" in message and "sysu, regdb, llcm, synthetic" in message
    from dmdl_cli.data.sources import read_source

    with pytest.raises(DmdlError, match="unknown data set 'market'"):
        read_source("market", tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  dataset: market\n")
    with pytest.raises(DmdlError, match="data.dataset"):
        load_recipe(recipe)


def test_the_recipe_and_the_cli_choices_come_from_the_table():
    import dataclasses

    field = next(f for f in dataclasses.fields(DataRecipe) if f.name == "dataset")
    assert field.metadata["choices"] == DATASET_NAMES == tuple(DATA_SETS)


def test_the_table_loads_neither_torch_nor_a_reader():
    code = ("import sys, dmdl_cli.datasets; "
            "print(sorted(m for m in ('torch', 'numpy', 'dmdl_cli.data.sources') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.strip()
    assert out == "[]"
