#!/usr/bin/env bash
# One GPU check of dinokit: the `gpu` tests, every benchmark at GPU sizes, a VOC-sized table row on the synthetic
# benchmark, all figures in one JSON.
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--dry-run] [--full] [--budget SECONDS] [OUT_DIR]
#
# OUT_DIR defaults to $OUT, else runs/gpu_check. It receives gpu_check.json (every step's status, wall time, peak host
# RAM and printed figures, the pytest results and the machine), logs/<step>.log, figures/<step>.json and steps/.
#   --device   cuda (default) or cpu.
#   --dry-run  every step once at its minimum size (tiny models, a few images): a few minutes on a CPU.
#   --full     the VOC-sized row at VOC's size (10,582 train / 1,449 val, protocol defaults); this alone takes longer
#              than the 8-minute budget of the default run, which uses 128 / 32 images.
#   --budget   seconds for the whole run (default 470 = under 8 min, 3600 with --full, 900 with --dry-run). Every step
#              runs under `timeout` with min(its own limit, the time left); a step that no longer fits is recorded as
#              skipped. Steps run in order of importance: tests, then each benchmark at ViT-S/14 224, the VOC row,
#              then the larger configurations (ViT-B/14, 518 px); with --full the VOC row comes right after the tests.
# Nothing is installed: the project is imported from the environment, or from src/ when it is not installed.
# Exit status: 0 when every step that ran passed, 1 otherwise, 2 for a usage or set-up error.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE=cuda DRY=0 FULL=0 BUDGET="" DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:-}; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --full) FULL=1; shift ;;
    --budget) BUDGET=${2:-}; shift 2 ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; echo "hint: see $0 --help" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device $DEVICE; choose cuda or cpu" >&2; exit 2 ;; esac
if [ "$DRY" = 1 ] && [ "$FULL" = 1 ]; then echo "error: --dry-run and --full exclude each other" >&2; exit 2; fi
MODE=quick; [ "$DRY" = 1 ] && MODE=dry; [ "$FULL" = 1 ] && MODE=full
if [ -z "$BUDGET" ]; then BUDGET=470; [ "$MODE" = full ] && BUDGET=3600; [ "$MODE" = dry ] && BUDGET=900; fi
case "$BUDGET" in ''|*[!0-9]*) echo "error: --budget $BUDGET must be whole seconds" >&2; exit 2 ;; esac
DIR=${DIR:-${OUT:-$ROOT/runs/gpu_check}}
mkdir -p "$DIR/logs" "$DIR/figures" "$DIR/steps" || exit 2
DIR=$(cd "$DIR" && pwd)
rm -f "$DIR"/steps/*.json "$DIR"/figures/*.json "$DIR"/pytest_*.xml "$DIR/gpu_check.json"

cd "$ROOT" || exit 2
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
[ -z "$PY" ] && PY=$(command -v python3 || command -v python)
if ! "$PY" -c "import dinokit" 2>/dev/null; then export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! "$PY" -c "import dinokit, torch" 2>/dev/null; then
  echo "error: $PY cannot import dinokit and torch" >&2
  echo "hint: run with PYTHON=/path/to/python of an environment that has the project's dependencies" >&2; exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "error: --device cuda but torch sees no CUDA device on this machine" >&2
  echo "hint: use --device cpu (with --dry-run for the quick proof that every step runs)" >&2; exit 2
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
if [ "$DEVICE" = cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}; fi

START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=10   # seconds kept for collecting the results
FAILED=0

# step NAME LIMIT_SECONDS CMD... : run CMD under timeout, record status, wall time and peak RSS
step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  if [ "$left" -lt 15 ]; then
    "$PY" benchmarks/gpu_check.py exec --record "$DIR/steps/$name.json" --name "$name" --skip budget -- "$@"
    printf '%-28s skipped (budget of %s s spent)\n' "$name" "$BUDGET"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0; t0=$(date +%s)
  timeout -k 10 $((limit + 15)) "$PY" benchmarks/gpu_check.py exec --record "$DIR/steps/$name.json" --name "$name" \
    --limit "$limit" -- "$@" > "$DIR/logs/$name.log" 2>&1
  local rc=$?
  local status=ok; [ $rc -ne 0 ] && status="FAILED rc=$rc" && FAILED=1
  [ $rc -eq 124 ] && status="TIMEOUT after ${limit} s"
  printf '%-28s %-22s %5d s   (log: logs/%s.log)\n' "$name" "$status" $(( $(date +%s) - t0 )) "$name"
  if [ $rc -ne 0 ]; then tail -n 5 "$DIR/logs/$name.log" | sed 's/^/    | /'; fi
  return 0
}
fig() { echo "--json=$DIR/figures/$1.json"; }

echo "dinokit GPU check: device $DEVICE, mode $MODE, budget $BUDGET s, output $DIR"
step env 60 "$PY" benchmarks/gpu_check.py env --json "$DIR/figures/env.json"
step tests_gpu 150 "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider --junitxml="$DIR/pytest_gpu.xml"
if [ "$DEVICE" = cpu ]; then  # the CPU self-checks of the same check functions
  step tests_selfcheck 120 "$PY" -m pytest -m "not gpu" tests/gpu -q -p no:cacheprovider \
    --junitxml="$DIR/pytest_selfcheck.xml"
fi

D=(--device "$DEVICE")
if [ "$MODE" = dry ]; then
  step features_tiny 120 "$PY" benchmarks/bench_features.py "${D[@]}" --model tiny_dinov2 --size 56 --n 8 --batch 4 \
    --workers 0 --repeats 1 "$(fig features_tiny)"
  step rasa_tiny 120 "$PY" benchmarks/bench_rasa.py "${D[@]}" --arch vit_small_patch14_dinov2 --size 56 --batch 1 \
    --repeats 1 --p1-batch 2 --p1-tokens 64 --p1-dim 128 "$(fig rasa_tiny)"
  step density_crops_tiny 120 "$PY" benchmarks/bench_density_crops.py "${D[@]}" --backbone tiny_dino --n 16 \
    --size 64 --batch 8 --att_size 64 --out 32 --per_sample_n 8 "$(fig density_crops_tiny)"
  step neco_tiny 180 "$PY" benchmarks/bench_neco.py "${D[@]}" --backbone tiny_dino --rows 64 --repeats 1 --pairs 1 \
    --batch 2 --image-size 48 --global-size 32 --local-size 16 --roi 2 --head-hidden 32 --head-dim 16 \
    "$(fig neco_tiny)"
  step repalign_tiny 120 "$PY" benchmarks/bench_repalign.py "${D[@]}" --batch 2 --depth 1 --dim 64 --steps 1 \
    --size 56 --threads 1 "$(fig repalign_tiny)"
  step eval_tiny 180 "$PY" benchmarks/bench_eval.py "${D[@]}" --tokens 5000 --iters 2 --memory 2000 --queries 256 \
    --mem-images 4 --size 56 "$(fig eval_tiny)"
  step voc_row 300 "$PY" benchmarks/gpu_check.py voc-row --mode dry "${D[@]}" --out "$DIR/voc_row" \
    --json "$DIR/figures/voc_row.json" --budget 290
else
  # one round of the backbone benchmarks: ViT-S/14 or ViT-B/14 (random weights) at 224 or 518 px
  bench_round() {  # $1 = s|b, $2 = 224|518
    local v=$1 s=$2 short arch dim local_size img batch
    if [ "$v" = s ]; then short=dinov2_vits14 arch=vit_small_patch14_dinov2 dim=384
    else short=dinov2_vitb14 arch=vit_base_patch14_dinov2 dim=768; fi
    if [ "$s" = 224 ]; then local_size=98 img=256 batch=16; else local_size=224 img=576 batch=8; fi
    local tag="${v}14_$s"
    step "features_$tag" 90 "$PY" benchmarks/bench_features.py "${D[@]}" --model "$short" --size "$s" --n 128 \
      --batch 32 --workers 4 --repeats 2 "$(fig "features_$tag")"
    step "rasa_$tag" 60 "$PY" benchmarks/bench_rasa.py "${D[@]}" --arch "$arch" --size "$s" --batch 8 --repeats 5 \
      "$(fig "rasa_$tag")"
    step "density_crops_$tag" 90 "$PY" benchmarks/bench_density_crops.py "${D[@]}" --backbone "$short" \
      --att_size "$s" --size 512 --out 224 --n 128 --batch 32 --per_sample_n 8 "$(fig "density_crops_$tag")"
    step "neco_$tag" 90 "$PY" benchmarks/bench_neco.py "${D[@]}" --backbone "$short" --global-size "$s" \
      --local-size "$local_size" --image-size "$img" --batch "$batch" --step-repeats 2 "$(fig "neco_$tag")"
    step "repalign_$tag" 60 "$PY" benchmarks/bench_repalign.py "${D[@]}" --dim "$dim" --depth 12 --size "$s" \
      --batch 8 --steps 3 --threads 8 "$(fig "repalign_$tag")"
  }
  voc_row() {  # the VOC-sized row; its commands share the step's time
    local limit=$1 left=$((DEADLINE - $(date +%s) - RESERVE))
    [ "$limit" -gt "$left" ] && limit=$left
    step voc_row "$limit" "$PY" benchmarks/gpu_check.py voc-row --mode "$MODE" "${D[@]}" --out "$DIR/voc_row" \
      --json "$DIR/figures/voc_row.json" --budget $((limit - 10))
  }
  [ "$MODE" = full ] && voc_row $((BUDGET - 300))  # --full: the row first, the benchmarks in what is left
  bench_round s 224
  step eval 150 "$PY" benchmarks/bench_eval.py "${D[@]}" --tokens 100000 --memory 50000 --queries 10000 \
    --mem-images 100 --size 448 "$(fig eval)"
  [ "$MODE" = quick ] && voc_row 120
  bench_round b 224
  bench_round s 518
  bench_round b 518
fi

WALL=$(( $(date +%s) - START ))
OPTS=$(printf '{"device": "%s", "mode": "%s", "budget_s": %s, "out": "%s"}' "$DEVICE" "$MODE" "$BUDGET" "$DIR")
"$PY" benchmarks/gpu_check.py collect --dir "$DIR" --wall "$WALL" --options "$OPTS"
rc=$?
[ $FAILED -ne 0 ] && rc=1
exit $rc
