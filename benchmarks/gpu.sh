#!/usr/bin/env bash
# The GPU checks of issue 18, in one command (run from the repository root, venv active):
#
#   benchmarks/gpu.sh              # on a CUDA machine: the real sizes (about 30-40 min on one GPU)
#   benchmarks/gpu.sh --dry-run    # anywhere, CPU only: the same steps at tiny size (minutes)
#   benchmarks/gpu.sh --out DIR    # where the results go (default benchmarks/gpu-results-<time>)
#
# 1. python -m regft.plan cars --preset paper --weights random  (the preflight, JSON + table)
# 2. generation: SD 2.1-base architecture (random weights), 512 px x 50 steps, fp16, images/s of
#    a plain diffusers loop vs the Ray Data actor (1 GPU), at batch 8 and at batch 16
# 3. fine-tuning: ViT-B/16 (random weights) on 224 px images, bf16, images/s of a plain loop vs
#    Ray Train with 1 worker (1 GPU)
# Everything runs offline (HF_HUB_OFFLINE=1): the real architectures come from the configs shipped
# in regft, with seeded random weights, so the costs are real and the pixels are noise.
# Each step writes <step>.json and <step>.log into the output folder; paste the tables printed
# (also in the logs) into benchmarks/RESULTS.md. A failing step stops the script (set -e).
set -euo pipefail

DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "benchmarks/gpu.sh: unknown argument '$1' (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${PYTHON:-python}"
OUT="${OUT:-benchmarks/gpu-results-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TQDM_DISABLE=1

if [ "$DRY_RUN" = 0 ]; then
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device visible to torch; run it on a GPU machine or add --dry-run" >&2
    exit 2
  fi
  # the paper job's plan on this GPU (its memory is read from the device)
  PLAN=(cars --preset paper --weights random)
  # real sizes: SD 2.1-base at 512 px x 50 steps fp16; 4 batches per run after the first
  GEN_COMMON=(--pipeline sd21-random --device cuda --dtype fp16 --resolution 512 --steps 50
              --runs plain,ray1 --repeats 2)
  GEN_BATCHES=(8 16)
  gen_counts() { echo "--classes 2 --per-class $((2 * $1)) --shard-size $1"; }
  TRAIN=(--model ViT-B-16 --image-size 224 --device cuda --precision bf16 --batch-size 128
         --images 4096 --epochs 3 --repeats 2 --runs plain,ray1)
else
  # the same code paths on CPU at tiny size: the smoke preset's tiny models, minimal counts
  PLAN=(cars --preset smoke --max-classes 2 --images-per-class 4)
  GEN_COMMON=(--pipeline bench --device cpu --dtype fp32 --resolution 64 --steps 2
              --runs plain,ray1 --repeats 1)
  GEN_BATCHES=(2 4)
  gen_counts() { echo "--classes 2 --per-class $1 --shard-size $1"; }
  TRAIN=(--model tiny --image-size 32 --device cpu --precision fp32 --batch-size 16
         --images 128 --epochs 2 --repeats 1 --runs plain,ray1)
fi

step() {  # step NAME COMMAND...: run it, keep its output, say how long it took
  local name="$1"; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: done in $((SECONDS - t0)) s (log: $OUT/$name.log)"
}

step plan "$PYTHON" -m regft.plan "${PLAN[@]}" --json "$OUT/plan.json"
for b in "${GEN_BATCHES[@]}"; do
  # shellcheck disable=SC2046  # gen_counts prints flags to split
  step "generation-b$b" "$PYTHON" benchmarks/generation.py "${GEN_COMMON[@]}" --batch-size "$b" \
    $(gen_counts "$b") --json "$OUT/generation-b$b.json"
done
step training "$PYTHON" benchmarks/training.py "${TRAIN[@]}" --json "$OUT/training.json"
echo "results: $OUT ($(ls "$OUT" | tr '\n' ' '))"
