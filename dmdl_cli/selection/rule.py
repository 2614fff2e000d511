"""The label-free selection rule: which epoch's model a run keeps, from its criteria records.

A rule is the recipe's ``select:`` section (:class:`dmdl_cli.recipe.SelectRecipe`), fixed before
training. Applied to the ``kind: criteria`` records of a stage's log
(:func:`dmdl_cli.clustering.criteria.epoch_criteria`; record ``epoch`` = the epochs the model
had trained, so its checkpoint is ``epoch-NNN.pt`` with NNN = epoch):

1. ``criterion: last``: the last epoch, whatever the criteria say (the behaviour without a
   rule; warm-up and guard do not apply).
2. Otherwise an epoch is eligible when ``epoch >= warmup``, its criterion is defined (not None
   or NaN) and its ``largest_share`` (the worse modality's) is at most ``max_largest_share``
   (the collapse guard: one cluster holding most images is stable and robust too).
3. Among the eligible epochs, those whose criterion is within ``tolerance`` of the best
   (higher is better, or lower for the costs: :data:`dmdl_cli.clustering.criteria.DIRECTIONS`)
   tie, and the tie goes to the later epoch (``tie: later``) or the earlier (``earlier``).
4. No eligible epoch: the last epoch, and the reason says why.
5. Stage 2 only, with ``between_stages`` naming a criterion: the model stage 2 started from
   (its record of epoch 0) replaces stage 2's choice when it scores better by that criterion
   by more than ``tolerance`` (:func:`choose_between_stages`).

Pure: records in, a :class:`Choice` out. It reads no file and no test row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from dmdl_cli.clustering.criteria import DIRECTIONS, criterion_value
from dmdl_cli.recipe import SelectRecipe


@dataclass(frozen=True)
class Choice:
    """The epoch a rule chose (None: there was no record at all), its criterion value, why, and
    the epochs it chose among."""

    epoch: int | None
    criterion: str
    value: float | None
    reason: str
    eligible: tuple[int, ...] = ()


def criteria_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ``kind: criteria`` records of a log, one per epoch (the last written wins: a resumed
    run writes an epoch again), in epoch order."""
    by_epoch: dict[int, Mapping[str, Any]] = {}
    for rec in records:
        if rec.get("kind", "criteria") == "criteria" and isinstance(rec.get("epoch"), int):
            by_epoch[int(rec["epoch"])] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def choose_epoch(records: Iterable[Mapping[str, Any]], rule: SelectRecipe, *,
                 last_epoch: int | None = None) -> Choice:
    """Apply ``rule`` to criteria ``records`` (dicts as in ``log.jsonl``; other kinds ignored).

    ``last_epoch``: the epochs the stage trained (its final model), when the records do not
    reach it; by default the largest record epoch.
    """
    recs = criteria_records(records)
    epochs = [int(r["epoch"]) for r in recs]
    last = last_epoch if last_epoch is not None else (max(epochs) if epochs else None)
    name = rule.criterion
    if last is None:
        return Choice(None, name, None, "no criteria records and no last epoch to choose")
    if name == "last":
        return Choice(last, name, None, f"epoch {last}: the last epoch (select.criterion: last)",
                      (last,))
    if name not in DIRECTIONS:
        raise ValueError(f"unknown selection criterion {name!r}")
    direction = DIRECTIONS[name]
    eligible: list[tuple[int, float]] = []
    guarded: list[int] = []
    for rec in recs:
        epoch, value = int(rec["epoch"]), criterion_value(rec, name)
        if epoch < rule.warmup or not math.isfinite(value):
            continue
        share = criterion_value(rec, "largest_share")
        if math.isfinite(share) and share > rule.max_largest_share:
            guarded.append(epoch)
            continue
        eligible.append((epoch, value))
    guard_note = (f"; epochs {_span(guarded)} left out: a cluster held more than "
                  f"{rule.max_largest_share:.0%} of a modality" if guarded else "")
    if not eligible:
        return Choice(last, name, None,
                      f"epoch {last}: the last epoch, as no epoch >= warm-up {rule.warmup} has a "
                      f"defined {name} within the collapse guard{guard_note}")
    best = max(direction * v for _, v in eligible)
    tied = [(e, v) for e, v in eligible if direction * v >= best - rule.tolerance]
    epoch, value = max(tied) if rule.tie == "later" else min(tied)
    better = "highest" if direction > 0 else "lowest"
    ties = (f"; {len(tied)} within tolerance {rule.tolerance:g}: the {rule.tie}"
            if len(tied) > 1 else "")
    return Choice(epoch, name, value,
                  f"epoch {epoch}: the {better} {name} ({value:.4g}) of the {len(eligible)} "
                  f"eligible epochs {_span([e for e, _ in eligible])} (warm-up {rule.warmup})"
                  f"{ties}{guard_note}",
                  tuple(e for e, _ in eligible))


def choose_between_stages(records: Iterable[Mapping[str, Any]], choice: Choice,
                          rule: SelectRecipe) -> Choice:
    """Stage 2's choice under ``select.between_stages``: ``choice`` (stage 2's own, by
    :func:`choose_epoch`), or the model stage 2 started from (its record of epoch 0: stage 1's
    model, labelled as stage 2 labels) when that scores better by the between-stages criterion
    by more than ``tolerance`` and is within the collapse guard. A tie keeps stage 2's. With
    ``between_stages: stage2`` the choice is returned unchanged."""
    name = rule.between_stages
    if name == "stage2" or choice.epoch is None:
        return choice
    recs = {int(r["epoch"]): r for r in criteria_records(records)}
    start, chosen = recs.get(0), recs.get(choice.epoch)
    v0 = criterion_value(start, name) if start is not None else float("nan")
    vc = criterion_value(chosen, name) if chosen is not None else float("nan")

    def kept(why: str) -> Choice:
        return Choice(choice.epoch, choice.criterion, choice.value,
                      f"{choice.reason}; stage 2's model is kept over the one it started from: "
                      f"{why} (select.between_stages: {name})", choice.eligible)

    if not (math.isfinite(v0) and math.isfinite(vc)):
        return kept(f"{name} is not defined for both")
    share = criterion_value(start, "largest_share")
    if math.isfinite(share) and share > rule.max_largest_share:
        return kept(f"the start model's largest cluster holds more than "
                    f"{rule.max_largest_share:.0%} of a modality")
    direction = DIRECTIONS[name]
    if direction * (v0 - vc) > rule.tolerance:
        return Choice(0, name, v0,
                      f"epoch 0, the model stage 2 started from (stage 1's): its {name} "
                      f"({v0:.4g}) is better than that of stage 2's own choice ({vc:.4g}; "
                      f"{choice.reason}) (select.between_stages: {name})",
                      (0, *choice.eligible))
    return kept(f"its {name} {vc:.4g} against {v0:.4g}")


def _span(epochs: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``1-3, 5``."""
    parts: list[tuple[int, int]] = []
    for e in sorted(epochs):
        if parts and parts[-1][1] == e - 1:
            parts[-1] = (parts[-1][0], e)
        else:
            parts.append((e, e))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


__all__ = ["Choice", "choose_between_stages", "choose_epoch", "criteria_records"]
