"""The label-free selection rule (dmdl_cli/selection/rule.py) and its `select:` recipe section."""
from __future__ import annotations

import dataclasses

import pytest

from dmdl_cli.errors import DmdlError
from dmdl_cli.recipe import SELECT_CRITERIA, Recipe, SelectRecipe, load_recipe
from dmdl_cli.selection.rule import choose_epoch, criteria_records


def records(values, key="eps_robustness", shares=None, **extra):
    shares = shares or [0.1] * len(values)
    return [{"kind": "criteria", "epoch": e, "step": 0, key: v, "largest_share": s, **extra}
            for e, (v, s) in enumerate(zip(values, shares))]


def rule(**changes) -> SelectRecipe:
    """The default rule judged by the records' criterion (eps_robustness unless changed)."""
    return dataclasses.replace(SelectRecipe(), **{"criterion": "eps_robustness", **changes})


def test_the_best_epoch_after_warmup_wins_and_ties_go_to_the_later():
    recs = records([0.99, 0.5, 0.7, 0.6, 0.7, 0.65])
    choice = choose_epoch(recs, rule())  # warm-up 1: the starting model (0.99) is not a candidate
    assert (choice.epoch, choice.value) == (4, 0.7)
    assert choice.eligible == (1, 2, 3, 4, 5)
    assert "epoch 4" in choice.reason and "the later" in choice.reason
    assert choose_epoch(recs, rule(tie="earlier")).epoch == 2
    assert choose_epoch(recs, rule(warmup=0)).epoch == 0
    assert choose_epoch(recs, rule(warmup=3)).epoch == 4
    # tolerance: values within it of the best tie
    assert choose_epoch(recs, rule(tolerance=0.06)).epoch == 5
    assert choose_epoch(recs, rule(tolerance=0.06, tie="earlier")).epoch == 2


def test_costs_are_minimised_and_last_ignores_the_criteria():
    recs = records([0.4, 0.3, 0.2, 0.25], key="matching_cost")
    assert choose_epoch(recs, rule(criterion="matching_cost")).epoch == 2
    last = choose_epoch(recs, rule(criterion="last", warmup=10))
    assert last.epoch == 3 and "last epoch" in last.reason
    assert choose_epoch(recs, rule(criterion="last"), last_epoch=4).epoch == 4
    assert choose_epoch([], rule(criterion="last"), last_epoch=4).epoch == 4
    assert choose_epoch([], rule()).epoch is None


def test_the_collapse_guard_and_undefined_values_exclude_epochs():
    recs = records([0.1, 0.5, 0.9, 0.6], shares=[0.1, 0.2, 0.8, 0.3])
    choice = choose_epoch(recs, rule())
    assert choice.epoch == 3 and "2 left out" in choice.reason.replace("epochs ", "")
    assert choose_epoch(recs, rule(max_largest_share=0.9)).epoch == 2
    # stability is undefined at the first epoch (None in the log): never chosen
    recs = records([None, 0.8, 0.9, 0.85], key="label_ari")
    assert choose_epoch(recs, rule(criterion="label_ari", warmup=0)).epoch == 2
    # nothing eligible: the last epoch, saying why
    fallback = choose_epoch(records([0.9, 0.9], shares=[0.9, 0.9]), rule())
    assert fallback.epoch == 1 and "no epoch" in fallback.reason and fallback.value is None


def test_only_criteria_records_count_and_a_rewritten_epoch_replaces_the_old():
    log = [{"kind": "start", "epoch": 0, "step": 0},
           *records([0.2, 0.9]),
           {"kind": "step", "epoch": 1, "step": 3, "eps_robustness": 5.0},  # not a criteria record
           {"kind": "criteria", "epoch": 1, "step": 0, "eps_robustness": 0.1, "largest_share": 0.1},
           *records([0.0, 0.0, 0.3])[2:]]
    recs = criteria_records(log)
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert recs[1]["eps_robustness"] == 0.1  # written again after a resume: the later record
    assert choose_epoch(log, rule()).epoch == 2


def test_select_section_is_validated_naming_the_key(tmp_path):
    base = load_recipe()
    assert base.select == SelectRecipe() and base.select.criterion in SELECT_CRITERIA
    assert "last" in SELECT_CRITERIA
    ok = load_recipe(overrides=["select.criterion=last", "select.warmup=3", "select.tie=earlier"])
    assert (ok.select.criterion, ok.select.warmup, ok.select.tie) == ("last", 3, "earlier")
    assert ok.hash() != base.hash()  # the rule is part of the hashed recipe
    for override, words in (("select.criterion=test_map", "is not one of"),
                            ("select.warmup=-1", "below the minimum"),
                            ("select.tie=middle", "is not one of"),
                            ("select.max_largest_share=1.5", "above the maximum"),
                            ("select.eps_delta=0", "open interval"),
                            ("select.tolerance=-0.1", "below the minimum"),
                            ("select.nope=1", "unknown recipe key 'select.nope'")):
        with pytest.raises(DmdlError, match="select") as err:
            load_recipe(overrides=[override])
        assert words in str(err.value), override
    path = tmp_path / "r.yaml"
    path.write_text("select:\n  criterion: label_ari\n  warmup: 2\n")
    assert load_recipe(path).select.criterion == "label_ari"
    assert "select" in {f.name for f in dataclasses.fields(Recipe)}


def test_between_stages_keeps_the_start_model_only_when_it_scores_better():
    from dmdl_cli.selection.rule import choose_between_stages

    # stage 2's records: epoch 0 is the model it started from (stage 1's)
    recs = records([0.5, 0.8, 0.9], key="eps_robustness")
    for r, nn in zip(recs, (0.6, 0.4, 0.3)):
        r["mutual_nn"] = nn
    own = choose_epoch(recs, rule())
    assert own.epoch == 2
    assert choose_between_stages(recs, own, rule()) == own  # between_stages: stage2
    back = choose_between_stages(recs, own, rule(between_stages="mutual_nn"))
    assert (back.epoch, back.criterion, back.value) == (0, "mutual_nn", 0.6)
    assert "started from" in back.reason and own.reason in back.reason
    # within the tolerance: a tie, which stage 2 keeps
    assert choose_between_stages(recs, own, rule(between_stages="mutual_nn", tolerance=0.3)).epoch == 2
    # a cost: lower is better
    for r, cost in zip(recs, (0.5, 0.2, 0.3)):
        r["matching_cost"] = cost
    assert choose_between_stages(recs, own, rule(between_stages="matching_cost")).epoch == 2
    # a start model beyond the collapse guard, or a criterion it does not define: stage 2 stays
    recs[0]["largest_share"] = 0.9
    kept = choose_between_stages(recs, own, rule(between_stages="mutual_nn"))
    assert kept.epoch == 2 and "largest cluster" in kept.reason
    recs[0]["largest_share"], recs[0]["mutual_nn"] = 0.1, None
    assert choose_between_stages(recs, own, rule(between_stages="mutual_nn")).epoch == 2
