#!/usr/bin/env bash
# Reproduce DMDL on LLCM (paper recipe): prepare, stage 1, stage 2, both directions.
# Usage: recipes/reproduce/llcm.sh RAW_LLCM_DIR [WORKSPACE=runs/llcm]
source "$(dirname "$0")/_common.sh"
ROOT=${1:?usage: llcm.sh RAW_LLCM_DIR [WORKSPACE]}
WS=${2:-runs/llcm}
dmdl prepare-data --dataset llcm --root "$ROOT" --workspace "$WS" --recipe "$RECIPES/llcm.yaml" \
  "${OVERLAY[@]}" "${SETS[@]}"
pipeline "$WS"
