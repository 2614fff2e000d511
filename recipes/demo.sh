#!/usr/bin/env bash
# The whole DMDL pipeline on the embedded synthetic data set, on the CPU:
#   prepare-data -> cluster (untrained sanity row) -> pretrain-single -> train-cross -> select
#   (label-free choice of a model) -> evaluate -> report (per-epoch table and figures in
#   WORKSPACE/report).
# Usage: recipes/demo.sh [WORKSPACE] (default runs/demo). Re-running resumes a killed stage and
# skips finished ones. Extra recipe overrides: DMDL_SET="stage1.iters=4 ..." recipes/demo.sh
set -euo pipefail
WS=${1:-runs/demo}
HERE=$(cd "$(dirname "$0")" && pwd)
RECIPE=${DMDL_RECIPE:-$HERE/demo.yaml}
SETS=()
for kv in ${DMDL_SET:-}; do SETS+=(--set "$kv"); done
start=$(date +%s)

dmdl prepare-data --dataset synthetic --workspace "$WS" --recipe "$RECIPE" "${SETS[@]}"
if [ ! -f "$WS/labels/cluster-random-init.npz" ]; then
  dmdl cluster --workspace "$WS" --checkpoint imagenet
fi
# every epoch's model is kept (about 45 MB each) so that `dmdl select` can choose between them
dmdl pretrain-single --workspace "$WS" --resume --set run.keep_epochs=true
dmdl train-cross --workspace "$WS" --resume --set run.keep_epochs=true
dmdl select --workspace "$WS" --stage both
dmdl evaluate --workspace "$WS" --mode all --checkpoint imagenet
dmdl evaluate --workspace "$WS" --mode all --checkpoint "$WS/stage1/final.pt"
dmdl evaluate --workspace "$WS" --mode all
dmdl evaluate --workspace "$WS" --mode all-search --checkpoint selected
dmdl report "$WS"
echo "demo finished in $(( $(date +%s) - start )) s; workspace: $WS"
