#!/usr/bin/env bash
# The router search on PixArt-alpha 512 end to end on one CUDA GPU (training/configs/pixart_alpha_512_search.yaml),
# timed, with the GPU's peak memory, then its router's plans at three budgets; compare with the config's predictions.
#
#   bash samples/search_gpu.sh /path/to/PixArt-XL-2-512x512 [extra dit-cache-train flags]
#
# Writes outputs/search_gpu/{run/, search.log, gpu_memory.csv, summary.txt} (SEARCH_GPU_OUT=DIR moves them). Written
# without a GPU at hand: run end to end only on the CPU with a tiny random PixArt folder and --trainer.accelerator cpu
# --trainer.precision 32-true --model.num_steps 4 --model.search.max_flops 0.5 --model.search.refine_from null
# --model.search.calibration_prompts 1 --model.search.validation_prompts 0 --data.prompts '["a cat"]'.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?"give the model's local diffusers folder, e.g. bash samples/search_gpu.sh /models/PixArt-XL-2-512x512"}
shift
OUT=${SEARCH_GPU_OUT:-outputs/search_gpu}
mkdir -p "$OUT"
POLL=""
if command -v nvidia-smi > /dev/null; then  # the GPU's memory in use, every second, while the search runs
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 1000 > "$OUT/gpu_memory.csv" &
  POLL=$!
fi
trap '[ -n "$POLL" ] && kill "$POLL" 2> /dev/null || true' EXIT
# the searched router's plans at three budgets: which steps compute
SUMMARY='
import sys
from dit_cache import CacheRouter
router = CacheRouter.load(sys.argv[1])
print("searched range:", router.flops_range, "plans measured:", router.metadata.get("search_evaluations"))
for flops in (0.45, 0.55, 0.7):
    if router.flops_range[0] <= flops <= router.flops_range[1]:
        computed = (router.plan(flops=flops).actions == 1).all(dim=1).nonzero().flatten().tolist()
        print(f"{flops:.0%} of the unit FLOPs skipped: steps computed {computed}")
'
START=$(date +%s)
/usr/bin/time -v dit-cache-train fit --config training/configs/pixart_alpha_512_search.yaml \
  --model.model "$MODEL" --trainer.default_root_dir "$OUT/run" "$@" 2>&1 | tee "$OUT/search.log"
END=$(date +%s)
{
  echo "search wall clock: $((END - START)) s"
  grep -E "Maximum resident set size|User time" "$OUT/search.log" || true
  if [ -n "$POLL" ]; then
    echo "GPU memory used, peak: $(sort -n "$OUT/gpu_memory.csv" | tail -1) MiB"
  fi
  python -c "$SUMMARY" "$OUT/run/router.safetensors"
} | tee "$OUT/summary.txt"
