"""Label-free selection of a checkpoint: the rule fixed in the recipe's ``select:`` section
applied to the per-epoch criteria of :mod:`dmdl_cli.clustering.criteria` (docs/selection.md).

- :mod:`dmdl_cli.selection.rule` — ``choose_epoch(records, rule)``: the chosen epoch and why,
  from criteria records as the training log holds them. It never reads a test row.
"""
