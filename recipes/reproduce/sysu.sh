#!/usr/bin/env bash
# Reproduce DMDL on SYSU-MM01 (paper recipe): prepare, stage 1, stage 2, full protocol table.
# Usage: recipes/reproduce/sysu.sh RAW_SYSU_MM01_DIR [WORKSPACE=runs/sysu]
# Re-running continues a killed run and skips finished stages. See _common.sh for DMDL_SET,
# DMDL_OVERLAY and NGPU.
source "$(dirname "$0")/_common.sh"
ROOT=${1:?usage: sysu.sh RAW_SYSU_MM01_DIR [WORKSPACE]}
WS=${2:-runs/sysu}
dmdl prepare-data --dataset sysu --root "$ROOT" --workspace "$WS" --recipe "$RECIPES/sysu.yaml" \
  "${OVERLAY[@]}" "${SETS[@]}"
pipeline "$WS"
