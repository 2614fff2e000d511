#!/usr/bin/env bash
# Reproduce DMDL on RegDB (paper recipe): one workspace per trial, then `dmdl report` over them
# (mean ± std over trials, written to PREFIX/report).
# Usage: recipes/reproduce/regdb.sh RAW_REGDB_DIR [WORKSPACE_PREFIX=runs/regdb] [TRIALS="1 2 ... 10"]
source "$(dirname "$0")/_common.sh"
ROOT=${1:?usage: regdb.sh RAW_REGDB_DIR [WORKSPACE_PREFIX] [TRIALS]}
PREFIX=${2:-runs/regdb}
TRIALS=${3:-1 2 3 4 5 6 7 8 9 10}
workspaces=()
for t in $TRIALS; do
  WS="$PREFIX/trial-$t"
  dmdl prepare-data --dataset regdb --trial "$t" --root "$ROOT" --workspace "$WS" \
    --recipe "$RECIPES/regdb.yaml" "${OVERLAY[@]}" "${SETS[@]}"
  pipeline "$WS"
  workspaces+=("$WS")
done
dmdl report "${workspaces[@]}" --out "$PREFIX/report"
