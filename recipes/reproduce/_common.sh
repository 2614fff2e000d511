# Shared by the reproduction scripts: launcher choice (torchrun on several GPUs) and overrides.
# Environment:
#   DMDL_SET      space-separated recipe overrides (section.key=value), e.g. for a quick check
#   DMDL_OVERLAY  an overlay YAML applied on top of the data set recipe (e.g. recipes/ablation/baseline.yaml)
#   NGPU          GPUs to use (default: all visible ones; 0 on a CPU-only machine)
set -euo pipefail
RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SETS=()
for kv in ${DMDL_SET:-}; do SETS+=(--set "$kv"); done
OVERLAY=()
if [ -n "${DMDL_OVERLAY:-}" ]; then OVERLAY=(--overlay "$DMDL_OVERLAY"); fi
if [ -z "${NGPU:-}" ]; then
  NGPU=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
train() {  # train STAGE-COMMAND WORKSPACE: one process, or torchrun with one process per GPU
  local cmd=$1 ws=$2
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NGPU" -m dmdl_cli "$cmd" --workspace "$ws" --resume \
      "${OVERLAY[@]}" "${SETS[@]}"
  else
    dmdl "$cmd" --workspace "$ws" --resume "${OVERLAY[@]}" "${SETS[@]}"
  fi
}
pipeline() {  # pipeline WORKSPACE: both stages (resumed or skipped when done) then evaluate all
  local ws=$1
  train pretrain-single "$ws"
  train train-cross "$ws"
  dmdl evaluate --workspace "$ws" --mode all "${OVERLAY[@]}" "${SETS[@]}"
}
