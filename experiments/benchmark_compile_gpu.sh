#!/usr/bin/env bash
# torch.compile + cache at full PixArt-alpha shapes (28 blocks, 1152 wide) on one CUDA GPU, fp16.
# Each run prints the eager rows, then compiled units without reuse / with uniform interval 2 / with a Taylor plan
# (interval 3, order 1; the router-like plan), speedups over compiled uncached, and the compile time.
#
#   bash experiments/benchmark_compile_gpu.sh                          # writes outputs/benchmark_compile_gpu_*.txt
#   bash experiments/benchmark_compile_gpu.sh --out docs/results       # the tracked results (docs/compile.md)
#
# Written without a GPU at hand: not run yet. "reduce-overhead" uses CUDA graphs (one per unit graph; the cache
# clones each compiled unit's output, since a CUDA graph rewrites its output buffers at every replay).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs
case "${1:-}" in
  "") ;;
  --out) OUT=${2:?"--out needs a folder, e.g. --out docs/results"} ;;
  *) echo "unknown argument $1; the only option is --out FOLDER (default: outputs)" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
COMMON=(--device cuda --dtype float16 --num_layers 28 --num_steps 20 --rounds 5)
for size in 64 128; do  # latent side 64: 512x512 images (1024 tokens); 128: 1024x1024 (4096 tokens)
  for mode in max-autotune-no-cudagraphs reduce-overhead; do
    out="$OUT/benchmark_compile_gpu_${size}_${mode}.txt"
    echo "# python experiments/benchmark_speed.py ${COMMON[*]} --sample_size $size --compile $mode" > "$out"
    python experiments/benchmark_speed.py "${COMMON[@]}" --sample_size "$size" --compile "$mode" 2>&1 \
      | grep -v "benchmark rounds" | tee -a "$out"
  done
done
