"""Typed recipes: loading, --set overrides, overlays, validation, hashes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dmdl_cli.datasets import DATASET_NAMES
from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import (
    MOVED_KEYS,
    REMOVED_KEYS,
    Recipe,
    Stage1Recipe,
    Stage2Recipe,
    StageRecipe,
    load_recipe,
    parse_override,
    reached,
    recipe_from_dict,
    schedule_warning,
    stage_augment,
    triplet_weight,
    unreached_thresholds,
)
from dmdl_cli.stages import STAGE1_SECTIONS, TRAINING_STAGES, stage_hash

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DATASET_RECIPES = sorted(RECIPES.glob("*.yaml"))
OVERLAYS = sorted((RECIPES / "ablation").glob("*.yaml"))


def test_the_shipped_recipes_are_there():
    assert {p.name for p in DATASET_RECIPES} == {"demo.yaml", "sysu.yaml", "regdb.yaml", "llcm.yaml"}
    assert {p.name for p in OVERLAYS} == {"baseline.yaml", "cai.yaml", "cai-augment.yaml",
                                          "cai-refine.yaml", "cai-align.yaml", "cbt.yaml", "dmdl.yaml"}


@pytest.mark.parametrize("path", DATASET_RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_says_what_its_file_says(path):
    recipe = load_recipe(path)
    expected = {"demo.yaml": "synthetic", "sysu.yaml": "sysu", "regdb.yaml": "regdb",
                "llcm.yaml": "llcm"}[path.name]
    assert recipe.data.dataset == expected
    # every value written in the file is the value loaded (nothing silently dropped)
    raw = yaml.safe_load(path.read_text())
    loaded = recipe.to_dict()
    for section, values in raw.items():
        for key, value in values.items():
            assert loaded[section][key] == value, f"{path.name}: {section}.{key}"
    # the YAML the workspace stores round-trips to the same recipe and hash
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe and again.hash() == recipe.hash()


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
@pytest.mark.parametrize("base", DATASET_RECIPES, ids=lambda p: p.name)
def test_every_overlay_composes_on_every_dataset_recipe(base, overlay):
    recipe = load_recipe(base, overlays=[overlay])
    plain = load_recipe(base)
    top = yaml.safe_load(overlay.read_text())
    want = plain.to_dict()
    for section, values in top.items():
        want[section].update(values)
    assert recipe.to_dict() == want


def test_ablation_overlays_switch_exactly_their_parts():
    # the rows of the paper's Table 3: (CAI, augmentation beyond the visible channel exchange,
    # label refinement, feature alignment)
    rows = {"baseline": (False, False, False, False), "cai": (True, False, False, False),
            "cai-augment": (True, True, False, False), "cai-refine": (True, False, True, False),
            "cai-align": (True, False, False, True), "cbt": (False, True, True, True),
            "dmdl": (True, True, True, True)}
    base = RECIPES / "sysu.yaml"
    plain = load_recipe(base).augment
    for name, (cai, augment, refine, align) in rows.items():
        r = load_recipe(base, overlays=[RECIPES / "ablation" / f"{name}.yaml"])
        assert (r.cai.enabled, r.cbt.refine, r.cbt.align) == (cai, refine, align), name
        assert r.cbt.augment  # every row has modality-specific views, at least the visible channel
        assert r.augment.channel_exchange_p == 1.0, name
        full = (r.augment.jitter_p, r.augment.ir_channel_copy_p, r.augment.ir_pseudo_colour_p)
        assert full == ((plain.jitter_p, plain.ir_channel_copy_p, plain.ir_pseudo_colour_p)
                        if augment else (0.0, 0.0, 0.0)), name
        # untouched sections keep the base values: stage 1, data and clustering in every row
        dmdl = load_recipe(base)
        assert r.stage1 == dmdl.stage1 and r.data == dmdl.data and r.cluster == dmdl.cluster
    # "the same as the data set recipes' defaults"
    assert load_recipe(base, overlays=[RECIPES / "ablation" / "dmdl.yaml"]) == load_recipe(base)
    # later overlays win key by key
    both = load_recipe(base, overlays=[RECIPES / "ablation" / "baseline.yaml",
                                       RECIPES / "ablation" / "cai.yaml"])
    assert both.cai.enabled and not both.cbt.refine


def test_set_overrides_parse_yaml_types_and_nest():
    r = load_recipe(RECIPES / "sysu.yaml", overrides=[
        "data.height=64",
        "stage1.lr=1e-4",           # YAML 1.1 reads this as a string; the recipe takes it as float
        "stage2.lr=0.002",
        "cluster.eps=0.5",
        "cbt.align=false",
        "model.pretrained=null",
        "model.arch=resnet18",
        "stage1.triplet_ramp=[[1, 0.5], [3, 1.0]]",
        "train.amp=bf16",
        "stage1.momentum=1",        # an int where a float is expected is a float
    ])
    assert r.data.height == 64 and isinstance(r.data.height, int)
    assert r.stage1.lr == pytest.approx(1e-4) and isinstance(r.stage1.lr, float)
    assert r.stage2.lr == pytest.approx(0.002)
    assert r.cluster.eps == 0.5
    assert r.cbt.align is False
    assert r.model.pretrained is None
    assert r.model.arch == "resnet18"
    assert r.stage1.triplet_ramp == [[1, 0.5], [3, 1.0]]
    assert r.train.amp == "bf16"
    assert r.stage1.momentum == 1.0 and isinstance(r.stage1.momentum, float)
    # everything not overridden is the file's value
    base = load_recipe(RECIPES / "sysu.yaml")
    assert r.stage1.epochs == base.stage1.epochs and r.eval == base.eval and r.augment == base.augment
    # later --set wins over earlier --set and over overlays
    r2 = load_recipe(RECIPES / "sysu.yaml", overlays=[RECIPES / "ablation" / "baseline.yaml"],
                     overrides=["cai.enabled=true", "data.height=32", "data.height=48"])
    assert r2.cai.enabled and r2.data.height == 48 and not r2.cbt.align


def test_parse_override():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    assert parse_override("a.b=") == (["a", "b"], None)
    assert parse_override(" a.b =[1, 2]") == (["a", "b"], [1, 2])
    for bad in ("noequals", "=3", "a..b=1", ".a=1"):
        with pytest.raises(DmdlError, match="--set"):
            parse_override(bad)


@pytest.mark.parametrize("override, key, words", [
    ("stage1.epoch=3", "stage1.epoch", ["unknown", "epochs"]),
    ("stage3.epochs=3", "stage3", ["unknown"]),
    ("model.arch=vgg", "model.arch", ["vgg", "resnet50_agw", "resnet18"]),
    ("cluster.eps=2", "cluster.eps", ["outside the open interval (0.0, 1.0)"]),
    ("cluster.eps=-0.1", "cluster.eps", ["outside the open interval"]),
    # Jaccard distances lie in [0, 1]: eps 0 or 1 would pass a closed range and fail later in
    # clustering, after feature extraction, so both ends are refused on load
    ("cluster.eps=0", "cluster.eps", ["outside the open interval", "both ends are excluded"]),
    ("cluster.eps=1", "cluster.eps", ["outside the open interval", "both ends are excluded"]),
    ("stage1.epochs=0", "stage1.epochs", ["below the minimum 1"]),
    ("stage1.epochs=2.5", "stage1.epochs", ["expected int"]),
    ("stage1.epochs=true", "stage1.epochs", ["expected int"]),
    ("stage1.lr=fast", "stage1.lr", ["expected float"]),
    ("cbt.align=3", "cbt.align", ["expected bool"]),
    ("stage1.triplet_ramp=5", "stage1.triplet_ramp", ["expected list"]),
    ("data.dataset=market", "data.dataset", ["sysu", "regdb"]),
    ("eval.shots=5", "eval.shots", ["1, 10"]),
    ("model=3", "model", ["expected a mapping"]),
    ("data.height.x=3", "data.height", ["not a section"]),
])
def test_bad_overrides_are_refused_naming_the_key(override, key, words):
    with pytest.raises(DmdlError) as info:
        load_recipe(RECIPES / "sysu.yaml", overrides=[override])
    message = str(info.value)
    assert f"'{key}" in message, message
    for word in words:
        assert word in message, message
    assert "\n" not in message


def test_bad_files_are_refused_naming_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(DmdlError, match="recipe file not found.*nope.yaml"):
        load_recipe(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  height: [1, 2\n")
    with pytest.raises(DmdlError, match=r"broken.yaml line \d+ is not valid YAML"):
        load_recipe(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(DmdlError, match="scalar.yaml must hold a mapping"):
        load_recipe(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("stage1:\n  epoch: 3\n")
    with pytest.raises(DmdlError, match=r"'stage1.epoch' \(.*typo.yaml\)"):
        load_recipe(RECIPES / "sysu.yaml", overlays=[typo])
    # the error names the overlay that brought the bad value, not the base
    bad_overlay = tmp_path / "bad.yaml"
    bad_overlay.write_text("cluster:\n  eps: 3\n")
    with pytest.raises(DmdlError, match=r"'cluster.eps' \(.*bad.yaml\)"):
        load_recipe(RECIPES / "sysu.yaml", overlays=[bad_overlay])
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_recipe(empty) == Recipe()  # an empty file is the defaults


def test_hash_is_stable_and_canonical():
    a = load_recipe(RECIPES / "sysu.yaml")
    b = load_recipe(RECIPES / "sysu.yaml")
    assert a.hash() == b.hash() and len(a.hash()) == 16
    int(a.hash(), 16)
    # the same values written in another key order / style give the same hash
    shuffled = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(a.to_dict().items()))}
    assert recipe_from_dict(shuffled).hash() == a.hash()
    assert load_recipe(RECIPES / "sysu.yaml", overrides=["stage1.lr=3.5e-4"]).hash() == a.hash()
    # any change of any value changes it
    assert load_recipe(RECIPES / "sysu.yaml", overrides=["eval.trials=3"]).hash() != a.hash()
    # a fixed recipe has a fixed hash across runs and machines (canonical JSON of the values)
    assert Recipe().hash() == Recipe().hash()
    assert a.hash() != Recipe().hash()


# which stage hashes must change when one value of a section changes
_CHANGES = {
    "data": ("data.height=64", {"stage1", "stage2"}),
    "synthetic": ("synthetic.material_coupling=-0.8", {"stage1", "stage2"}),
    "model": ("model.gem_p=4.0", {"stage1", "stage2"}),
    "cluster": ("cluster.k1=10", {"stage1", "stage2"}),
    "stage1": ("stage1.lr=0.001", {"stage1", "stage2"}),
    "train": ("train.seed=7", {"stage1", "stage2"}),
    "augment": ("augment.flip_p=0.1", {"stage1", "stage2"}),
    "cbt": ("cbt.align=false", {"stage1", "stage2"}),
    "stage2": ("stage2.lr=0.001", {"stage2"}),
    "cai": ("cai.weight=0.1", {"stage2"}),
    "association": ("association.method=hungarian", {"stage2"}),
    "eval": ("eval.trials=2", set()),
    "select": ("select.warmup=3", set()),
    "run": ("run.workers=2", set()),
}


def test_the_k1_of_the_adopting_modality_is_a_stage_2_key():
    base = load_recipe(RECIPES / "sysu.yaml")
    other = load_recipe(RECIPES / "sysu.yaml", overrides=["stage2.k1_adopting=7"])
    assert stage_hash(other, "stage1") == stage_hash(base, "stage1")
    assert stage_hash(other, "stage2") != stage_hash(base, "stage2")


def test_change_table_covers_every_section():
    assert set(_CHANGES) == {f.name for f in dataclasses.fields(Recipe)}


@pytest.mark.parametrize("section", sorted(_CHANGES))
def test_stage_hash_changes_only_with_its_sections(section):
    override, changed = _CHANGES[section]
    base = load_recipe(RECIPES / "sysu.yaml")
    other = load_recipe(RECIPES / "sysu.yaml", overrides=[override])
    assert (other.hash() != base.hash()) == (section != "run")
    for spec in TRAINING_STAGES:
        differs = stage_hash(other, spec.name) != stage_hash(base, spec.name)
        assert differs == (spec.name in changed), (section, spec.name)
        assert differs == (section in spec.sections)
    # the section hash is the hash of exactly those sections
    assert stage_hash(base, "stage1") == base.hash(STAGE1_SECTIONS)


@pytest.mark.parametrize("key, value", [("workers", 0), ("checkpoint_every", 1), ("eval_every", 3),
                                        ("feature_batch", 7), ("keep_epochs", True),
                                        ("tensorboard", True), ("threads", 1)])
def test_run_keys_change_no_hash(key, value):
    """The `run:` section changes how a run executes, never a result: no hash covers it."""
    base = load_recipe(RECIPES / "sysu.yaml")
    other = load_recipe(RECIPES / "sysu.yaml", overrides=[f"run.{key}={value}"])
    assert getattr(other.run, key) == value != getattr(base.run, key)
    assert other.hash() == base.hash()
    for spec in TRAINING_STAGES:
        assert stage_hash(other, spec.name) == stage_hash(base, spec.name)


@pytest.mark.parametrize("old, new", sorted((old, new) for old, (new, _) in MOVED_KEYS.items()))
def test_a_moved_key_is_refused_naming_its_new_place(tmp_path, old, new):
    section, name = old.split(".")
    new_section, new_name = new.split(".")
    value = "true" if isinstance(getattr(getattr(Recipe(), new_section), new_name), bool) else "1"
    old_file = tmp_path / "old.yaml"
    old_file.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(DmdlError, match=rf"'{old}' \(.*old.yaml\) moved to {new}: use {new} instead"):
        load_recipe(old_file)
    with pytest.raises(DmdlError, match=rf"'{old}' \(--set {old}={value}\) moved to {new}"):
        load_recipe(RECIPES / "demo.yaml", overrides=[f"{old}={value}"])
    assert load_recipe(RECIPES / "demo.yaml", overrides=[f"{new}={value}"])  # the new key is taken


@pytest.mark.parametrize("key", sorted(REMOVED_KEYS))
def test_a_key_a_stage_never_read_is_refused_naming_the_stage(tmp_path, key):
    section, name = key.split(".")
    old_file = tmp_path / "old.yaml"
    old_file.write_text(f"{section}:\n  {name}: never\n")
    with pytest.raises(DmdlError, match=rf"'{key}' \(.*old.yaml\): {section} has no {name}: "):
        load_recipe(old_file)
    with pytest.raises(DmdlError, match=rf"{section} has no {name}: .*remove the key"):
        load_recipe(RECIPES / "demo.yaml", overrides=[f"{key}=0"])


def test_each_stage_type_holds_only_the_keys_its_stage_reads():
    shared = {f.name for f in dataclasses.fields(StageRecipe)}
    assert {f.name for f in dataclasses.fields(Stage1Recipe)} - shared == {"refine_from"}
    assert {f.name for f in dataclasses.fields(Stage2Recipe)} - shared == {
        "onehot_epochs", "cross_sampler_from", "k1_adopting", "cross_memory_update",
        "triplet_all_modalities", "intra_targets", "memory_gradient", "cross_sampler",
        "confidence_gmm", "start_from"}
    assert not shared & {key.split(".")[1] for key in REMOVED_KEYS}
    r = Recipe()
    assert isinstance(r.stage1, Stage1Recipe) and isinstance(r.stage2, Stage2Recipe)
    # the stage-2 defaults are the paper's
    assert (r.stage2.onehot_epochs, r.stage2.cross_sampler_from, r.stage2.refine_topk,
            r.stage2.triplet_ramp) == (5, 40, 10, [[10, 0.5], [20, 1.0]])
    assert (r.stage1.refine_from, r.stage1.refine_topk) == (30, 3)


def test_choice_lists_are_what_the_implementations_accept():
    import torch

    from dmdl_cli import recipe as R
    from dmdl_cli.clustering import neighbors
    from dmdl_cli.clustering.association import _METHODS
    from dmdl_cli.data.augment import _MAP_FORMULAE
    from dmdl_cli.data.sources import read_source
    from dmdl_cli.model.backbone import _ARCH_SPECS
    from dmdl_cli.runtime import AMP_DTYPES
    from dmdl_cli.training.memory import ClusterMemory

    assert tuple(_ARCH_SPECS) == R.ARCHS and tuple(_MAP_FORMULAE) == R.COLOUR_MAPS
    assert tuple(AMP_DTYPES) == R.AMP_MODES and AMP_DTYPES["bf16"] is torch.bfloat16
    assert neighbors.METHODS is R.KNN_METHODS
    for rule in R.MEMORY_UPDATES:  # every declared memory update rule is one the memory runs
        assert ClusterMemory(4, 2, temp=0.05, momentum=0.2, rule=rule).rule == rule
    assert tuple(_METHODS) == R.ASSOCIATION_METHODS  # tests/test_association.py runs each
    for dataset in DATASET_NAMES:  # every name reaches a reader: the missing root is what is refused
        with pytest.raises(DmdlError, match="does not exist"):
            read_source(dataset, "/nonexistent-dmdl-root")


def test_triplet_ramp_holds_strictly_after_the_epoch_named():
    # the reference writes its ramps as `if epoch > 15: sigma = 0.25` (0-based epochs)
    ramp = [[15, 0.25], [25, 0.5], [35, 1.0]]
    assert [triplet_weight(ramp, e) for e in (0, 14, 15, 16, 25, 26, 35, 36, 99)] == [
        0.0, 0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert triplet_weight([[35, 1.0], [15, 0.25]], 20) == 0.25  # order of the pairs is free
    assert triplet_weight([], 10) == 0.0


@pytest.mark.parametrize("override, key", [
    ("stage1.refine_from=50", "stage1.refine_from=50"),
    ("stage2.cross_sampler_from=50", "stage2.cross_sampler_from=50"),
    ("stage2.cross_sampler_from=1000000", "stage2.cross_sampler_from=1000000"),
    ("stage2.onehot_epochs=50", "stage2.onehot_epochs=50"),
    ("stage2.triplet_ramp=[[10, 0.5], [49, 1.0]]", "stage2.triplet_ramp entry [49, 1.0]"),
    ("stage1.triplet_ramp=[[60, 1.0]]", "stage1.triplet_ramp entry [60, 1.0]"),
])
def test_thresholds_the_schedule_never_reaches_load_and_are_named_in_one_warning(override, key):
    recipe = load_recipe(RECIPES / "sysu.yaml", overrides=[override])
    assert unreached_thresholds(recipe) == [key]
    message = schedule_warning(recipe)
    assert key in message and "50 epochs" in message and "\n" not in message, message
    # the warning's own fix works: 'never' there loads and silences it
    fixed = override.split("=")[0] + "=never"
    assert schedule_warning(load_recipe(RECIPES / "sysu.yaml", overrides=[override, fixed])) is None


def test_a_schedule_shortened_by_set_loads_and_names_every_unreached_key_once():
    short = ["stage1.epochs=1", "stage1.iters=10", "stage2.epochs=1", "stage2.iters=10"]
    for name in ("sysu.yaml", "regdb.yaml", "llcm.yaml", "demo.yaml"):
        recipe = load_recipe(RECIPES / name, overrides=short)  # no refusal, one key at a time
        keys = unreached_thresholds(recipe)
        message = schedule_warning(recipe)
        for key in keys:
            assert message.count(key) == 1, (key, message)
        assert "stage1.triplet_ramp" in message and "stage2.cross_sampler_from" in message
    sysu = load_recipe(RECIPES / "sysu.yaml", overrides=short)
    assert [key.split("=")[0].split(" ")[0] for key in unreached_thresholds(sysu)] == [
        "stage1.refine_from", "stage1.triplet_ramp", "stage2.onehot_epochs",
        "stage2.cross_sampler_from", "stage2.triplet_ramp"]
    # a command names only its own stage's keys
    assert all(k.startswith("stage2.") for k in unreached_thresholds(sysu, ["stage2"]))
    assert schedule_warning(load_recipe(RECIPES / "sysu.yaml")) is None


def test_never_works_for_every_epoch_threshold():
    r = load_recipe(RECIPES / "sysu.yaml", overrides=[
        "stage1.refine_from=never", "stage2.onehot_epochs=never", "stage2.cross_sampler_from=never",
        "stage1.triplet_ramp=never", "stage2.triplet_ramp=[[never, 1.0], [3, 0.5]]"])
    assert (r.stage1.refine_from, r.stage2.onehot_epochs, r.stage2.cross_sampler_from) == ("never",) * 3
    assert r.stage1.triplet_ramp == []  # no entry: weight 0 throughout
    assert [triplet_weight(r.stage2.triplet_ramp, e) for e in (3, 4, 10**6)] == [0.0, 0.5, 0.5]
    assert unreached_thresholds(r) == []
    # one-hot throughout: stage 2 never refines (training/cross.py asks `reached`)
    assert not reached(r.stage2.onehot_epochs, 10**9) and reached(5, 5) and not reached(5, 4)


def test_the_last_epoch_is_a_valid_threshold_and_never_switches_off():
    last = load_recipe(RECIPES / "sysu.yaml", overrides=["stage2.cross_sampler_from=49",
                                                        "stage2.triplet_ramp=[[48, 1.0]]"])
    assert last.stage2.cross_sampler_from == 49 and unreached_thresholds(last) == []
    off = load_recipe(RECIPES / "sysu.yaml", overrides=["stage2.cross_sampler_from=never",
                                                       "stage1.refine_from=never"])
    assert off.stage2.cross_sampler_from == "never" and off.stage1.refine_from == "never"
    assert not reached("never", 10**9) and reached(49, 49) and not reached(49, 48)
    # a shorter schedule leaves a dataset recipe's thresholds unreached: named, not refused
    shorter = load_recipe(RECIPES / "sysu.yaml", overrides=["stage2.epochs=30"])
    assert "stage2.cross_sampler_from=40" in unreached_thresholds(shorter)
    for bad in ("stage2.cross_sampler_from=soon", "stage2.cross_sampler_from=-1",
                "stage1.refine_from=-1", "stage2.onehot_epochs=-1", "stage2.triplet_ramp=[[1]]",
                "stage2.onehot_epochs=soon", "stage2.triplet_ramp=[[soon, 1.0]]"):
        with pytest.raises(DmdlError, match=bad.split("=")[0]):
            load_recipe(RECIPES / "sysu.yaml", overrides=[bad])


def test_new_switches_validate_and_exist_where_they_apply():
    r = load_recipe(RECIPES / "sysu.yaml")
    assert (r.stage2.cross_memory_update, r.stage2.triplet_all_modalities, r.stage2.intra_targets) == (
        True, True, "hard")
    assert r.stage2.k1_adopting == 15 and load_recipe(RECIPES / "llcm.yaml").stage2.k1_adopting == 15
    for stage in (r.stage1, r.stage2):
        assert (stage.triplet, stage.loss_reduction, stage.memory_update, stage.camera_aware_sampling) == (
            "per-modality", "sum-modalities", "per-sample", True)
    with pytest.raises(DmdlError, match="unknown recipe key 'stage1.cross_memory_update'"):
        load_recipe(RECIPES / "sysu.yaml", overrides=["stage1.cross_memory_update=true"])
    for bad, word in (("stage1.triplet=cross", "per-modality"), ("stage2.loss_reduction=sum", "mean"),
                      ("stage2.memory_update=loop", "batch-mean"), ("stage2.intra_targets=soft", "hard"),
                      ("stage2.k1_adopting=0", "minimum")):
        with pytest.raises(DmdlError, match=word):
            load_recipe(RECIPES / "sysu.yaml", overrides=[bad])
    assert load_recipe(RECIPES / "sysu.yaml", overrides=["stage2.k1_adopting=null"]).stage2.k1_adopting is None


def test_regdb_schedule_switches_on_within_its_30_epochs():
    r = load_recipe(RECIPES / "regdb.yaml")
    assert r.stage1.epochs == r.stage2.epochs == 30
    assert r.stage2.cross_sampler_from == 25 and r.stage1.refine_from == "never"
    assert r.stage2.k1_adopting is None
    assert [triplet_weight(r.stage1.triplet_ramp, e) for e in (15, 16, 26, 29)] == [0.0, 0.25, 0.5, 0.5]
    assert [triplet_weight(r.stage2.triplet_ramp, e) for e in (10, 11, 21, 29)] == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("name, gmm", [("sysu", "per-cluster"), ("llcm", "per-cluster"),
                                       ("regdb", "global"), ("demo", "per-cluster")])
def test_paper_recipes_train_the_reference_sampler_mmd_and_gmm(name, gmm):
    r = load_recipe(RECIPES / f"{name}.yaml")
    assert (r.stage2.cross_sampler, r.cbt.mmd, r.stage2.confidence_gmm) == \
        ("union", "unbiased-bn-neck", gmm)
    # the defaults keep what dmdl trained before these keys existed
    d = Recipe()
    assert (d.stage2.cross_sampler, d.cbt.mmd, d.stage2.confidence_gmm, d.stage2.augment,
            d.stage1.augment) == ("shared", "biased-normalised", "per-cluster", {}, {})


# ------------------------------------------------------------ per-stage augmentation override
def test_regdb_stage2_erases_up_to_60_percent_while_stage1_keeps_50():
    r = load_recipe(RECIPES / "regdb.yaml")
    assert r.stage2.augment == {"erasing_scale": [0.02, 0.6]} and r.stage1.augment == {}
    assert stage_augment(r, r.stage2).erasing_scale == [0.02, 0.6]
    assert stage_augment(r, r.stage1).erasing_scale == [0.02, 0.5] == r.augment.erasing_scale
    # every other key is the augment section's
    assert dataclasses.replace(stage_augment(r, r.stage2), erasing_scale=[0.02, 0.5]) == r.augment
    for name in ("sysu", "llcm", "demo"):
        other = load_recipe(RECIPES / f"{name}.yaml")
        assert stage_augment(other, other.stage2) == other.augment


def test_any_augment_key_can_be_overridden_per_stage_and_only_that_stage_hash_moves():
    base = load_recipe(RECIPES / "sysu.yaml")
    s2 = load_recipe(RECIPES / "sysu.yaml", overrides=["stage2.augment.flip_p=0.0",
                                                       "stage2.augment.erasing_fill=zero"])
    assert (stage_augment(s2, s2.stage2).flip_p, stage_augment(s2, s2.stage2).erasing_fill) == \
        (0.0, "zero")
    assert stage_augment(s2, s2.stage1) == base.augment
    assert stage_hash(s2, "stage1") == stage_hash(base, "stage1")
    assert stage_hash(s2, "stage2") != stage_hash(base, "stage2")
    s1 = load_recipe(RECIPES / "sysu.yaml", overrides=["stage1.augment.ir_pseudo_colour_p=0.5"])
    assert stage_augment(s1, s1.stage1).ir_pseudo_colour_p == 0.5
    assert stage_hash(s1, "stage1") != stage_hash(base, "stage1")
    # an override equal to the section's value trains the same augmentation
    same = load_recipe(RECIPES / "sysu.yaml", overrides=["stage2.augment.pad=10"])
    assert stage_augment(same, same.stage2) == base.augment


@pytest.mark.parametrize("override, key, words", [
    ("stage2.augment.erasing_area=[0.02, 0.6]", "stage2.augment.erasing_area",
     "augment has no key"),
    ("stage2.augment.erasing_scale=[0.7, 0.6]", "stage2.augment.erasing_scale", "lo <= hi"),
    ("stage2.augment.erasing_scale=[0.02, 1.5]", "stage2.augment.erasing_scale", "<= 1.0"),
    ("stage1.augment.flip_p=2", "stage1.augment.flip_p", "above the maximum"),
    ("stage2.augment.ir_pseudo_colour_maps=[jet, sepia]", "stage2.augment.ir_pseudo_colour_maps",
     "'sepia' is not one of"),
    ("stage2.augment=3", "stage2.augment", "expected dict"),
])
def test_a_bad_augment_override_is_refused_naming_the_key(override, key, words):
    with pytest.raises(DmdlError) as info:
        load_recipe(RECIPES / "regdb.yaml", overrides=[override])
    message = str(info.value)
    assert f"'{key}'" in message and words in message and "\n" not in message, message
