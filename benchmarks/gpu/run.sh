#!/usr/bin/env bash
# The triton backend's GPU check, in one command (issues 4, 11; see benchmarks/gpu/README.md):
#
#   bash benchmarks/gpu/run.sh [--out DIR] [--dry-run] [--skip SECTION[,SECTION...]]
#
# Sections, each under its own time limit, each writing its results under the output folder as
# soon as they are measured ($OUT when set, else bench-out/gpu-<timestamp>):
#   env      GPU, driver, versions                                   -> env.txt
#   wheels   install peer wheels carried in .whl/ (no network; fetch_wheels.sh) -> run.log
#   model    the performance model's PREDICTIONS for this GPU        -> model.json
#   tests    GPU test subset (correctness, determinism, N·D ≥ 2³¹)   -> gpu_tests.xml, run.log
#   kernels  CLIP 32768, SigLIP 65536 vs the GEMM floor, once per triton path
#            (MMLOSS_TRITON_PATH=fused, then gemm)                   -> results.jsonl
#   clip     python -m mmloss.bench, CLIP 32768 bf16 with peers      -> bench_clip.json, bench.csv
#   siglip   python -m mmloss.bench, SigLIP 65536 bf16 with peers    -> bench_siglip.json, bench.csv
#   clip1m   CLIP N = M = 1,048,576 completes (lines at start, after the forward, at the end) -> results.jsonl
#   compare  predicted next to measured                              -> model.json (rewritten), run.log
#   nproc    only when >= 2 GPUs are visible: python -m mmloss.bench --nproc N (NCCL), not in the budget
# Every section runs under `timeout -s INT` (Python sees KeyboardInterrupt: pytest writes its XML and
# failure summary, partial results stay) with a hard kill 15 s later. Limits come from the number
# of Triton kernels each section compiles from a cold cache (compile_counts.py, counted on the CPU
# from the code) at SEC_PER_COMPILE seconds each, plus a base for start-up and run time; --dry-run
# prints the arithmetic. All limits together stay <= 540 s (9 minutes). Overrides: T_<SECTION>,
# SEC_PER_COMPILE, WORKERS, NPROC, NPROC_SIZES, MODEL_DEVICE (h100|h200|a100). Torch 2.11 / Triton 3.6.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
DRY=0
SKIP=","
OUTDIR=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTDIR=$2; shift ;;
    --skip) SKIP=",$2," ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUTDIR" ]; then
  OUTDIR="bench-out/gpu-$(date +%Y%m%d-%H%M%S)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --- limits from compile counts ------------------------------------------------------------------
# Assumed cost of one cold Triton compile on the GPU box (owner kernels at ~250 registers take the
# longest through ptxas); the tests compile in WORKERS parallel xdist groups, taken as an effective
# parallelism of TEST_PAR (groups are uneven).
SEC_PER_COMPILE=${SEC_PER_COMPILE:-4}
WORKERS=${WORKERS:-8}
TEST_PAR=${TEST_PAR:-5}
# Counted by `python benchmarks/gpu/compile_counts.py` (H200 plan); these defaults are used only
# when the count cannot run (a test keeps them equal to the counter's output).
COMPILES_TESTS=122
COMPILES_KERNELS=14
COMPILES_CLIP=0
COMPILES_SIGLIP=0
COMPILES_CLIP1M=1
COUNTED="defaults"
if COUNTS=$("$PY" benchmarks/gpu/compile_counts.py --shell 2>/dev/null); then
  eval "$COUNTS"
  COUNTED="compile_counts.py"
fi
# base seconds (start-up + run time, cache warm) per section
B_TESTS=60; B_KERNELS=50; B_CLIP=45; B_SIGLIP=45; B_CLIP1M=100
limit() {  # limit BASE COMPILES PARALLEL
  echo $(( $1 + ($2 * SEC_PER_COMPILE + $3 - 1) / $3 ))
}
T_WHEELS=${T_WHEELS:-30}
T_MODEL=${T_MODEL:-15}
T_TESTS=${T_TESTS:-$(limit $B_TESTS "$COMPILES_TESTS" "$TEST_PAR")}
T_KERNELS=${T_KERNELS:-$(limit $B_KERNELS "$COMPILES_KERNELS" 1)}
T_CLIP=${T_CLIP:-$(limit $B_CLIP "$COMPILES_CLIP" 1)}
T_SIGLIP=${T_SIGLIP:-$(limit $B_SIGLIP "$COMPILES_SIGLIP" 1)}
T_CLIP1M=${T_CLIP1M:-$(limit $B_CLIP1M "$COMPILES_CLIP1M" 1)}
T_COMPARE=${T_COMPARE:-15}
T_NPROC=${T_NPROC:-120}
TOTAL=$((T_WHEELS + T_MODEL + T_TESTS + T_KERNELS + T_CLIP + T_SIGLIP + T_CLIP1M + T_COMPARE))
PEERS_CLIP=${PEERS_CLIP:-open_clip,memeff,inf_cl,dense}
PEERS_SIGLIP=${PEERS_SIGLIP:-open_clip,siglip_kernel}

LOG="$OUTDIR/run.log"
STATUS=0
T0=$SECONDS

say() {
  if [ "$DRY" = 1 ]; then
    echo "$*"
  else
    echo "$*" | tee -a "$LOG"
  fi
}

# section NAME LIMIT COMMAND...: run COMMAND under `timeout -s INT LIMIT`, appending to run.log
section() {
  local name=$1 limit=$2
  shift 2
  case "$SKIP" in *",$name,"*) say "=== $name: skipped (--skip)"; return 0 ;; esac
  if [ "$DRY" = 1 ]; then
    say "=== $name (limit ${limit}s): $*"
    return 0
  fi
  say "=== $name (limit ${limit}s, t=$((SECONDS - T0))s): $*"
  local start=$SECONDS rc
  timeout -s INT --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "=== $name: TIME LIMIT (${limit}s) reached; partial results kept"
    STATUS=1
  elif [ "$rc" != 0 ]; then
    say "=== $name: exit status $rc"
    STATUS=1
  fi
  say "=== $name finished in $((SECONDS - start))s"
}

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUTDIR"
  : >"$LOG"
fi
say "mmloss triton GPU check -> $OUTDIR (dry run: $DRY)"
say "limits: base + compiles x ${SEC_PER_COMPILE}s / parallelism (compile counts: $COUNTED)"
say "  tests   $B_TESTS + $COMPILES_TESTS x $SEC_PER_COMPILE / $TEST_PAR = ${T_TESTS}s"
say "  kernels $B_KERNELS + $COMPILES_KERNELS x $SEC_PER_COMPILE = ${T_KERNELS}s"
say "  clip    $B_CLIP + $COMPILES_CLIP x $SEC_PER_COMPILE = ${T_CLIP}s"
say "  siglip  $B_SIGLIP + $COMPILES_SIGLIP x $SEC_PER_COMPILE = ${T_SIGLIP}s"
say "  clip1m  $B_CLIP1M + $COMPILES_CLIP1M x $SEC_PER_COMPILE = ${T_CLIP1M}s"
say "  wheels ${T_WHEELS}s, model ${T_MODEL}s, compare ${T_COMPARE}s; total ${TOTAL}s (budget 540s)"

# --- env ----------------------------------------------------------------------------------------
GPU_NAME=""
if [ "$DRY" = 1 ]; then
  say "=== env: nvidia-smi + versions -> $OUTDIR/env.txt"
else
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
    git -C "$ROOT" rev-parse HEAD 2>/dev/null
  } >"$OUTDIR/env.txt"
  tee -a "$LOG" <"$OUTDIR/env.txt"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
case "${MODEL_DEVICE:-$GPU_NAME}" in
  *[Hh]200*) MODEL=h200 ;;
  *[Aa]100*) MODEL=a100 ;;
  *[Hh]100*) MODEL=h100 ;;
  *) MODEL=h200 ;;
esac

# --- wheels: peers come as pre-downloaded wheels in .whl/ (fetch_wheels.sh) -------------------------
SITE=${TMPDIR:-/tmp}/mmloss-gpu-site
if ls .whl/*.whl >/dev/null 2>&1 || [ "$DRY" = 1 ]; then
  section wheels "$T_WHEELS" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
else
  say "=== wheels: none in .whl/ (peers missing here are reported as unavailable; bash benchmarks/gpu/fetch_wheels.sh)"
fi

# --- the model's predictions for this GPU (measured nothing) -----------------------------------------
section model "$T_MODEL" "$PY" -m mmloss.bench --model "$MODEL" --paths fused,gemm --json "$OUTDIR/model.json"

# --- tests ----------------------------------------------------------------------------------------
PYTEST_ARGS=(-q -p no:cacheprovider -rfE)
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  # one xdist group per (kernel family, dtype): no kernel compiled twice from a cold cache
  PYTEST_ARGS+=(-n "$WORKERS" --dist loadgroup)
fi
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST_ARGS+=(--timeout "$((T_TESTS - 20))")   # per test; the section's SIGINT comes first otherwise
fi
section tests "$T_TESTS" env -u TRITON_INTERPRET "$PY" -m pytest "${PYTEST_ARGS[@]}" \
  benchmarks/gpu/gpu_checks.py --junitxml="$OUTDIR/gpu_tests.xml"

# --- kernels vs floor, both triton paths ------------------------------------------------------------
HALF=$(( (T_KERNELS - 10) / 2 ))
section kernels "$T_KERNELS" bash -c "for p in fused gemm; do MMLOSS_TRITON_PATH=\$p timeout -s INT $HALF \
  $PY benchmarks/gpu/kernel_bench.py --only clip,parts,siglip --out '$OUTDIR/results.jsonl' --repeats 10 \
  --time-limit $((HALF - 20)); done"

# --- peers through the benchmark command ----------------------------------------------------------
section clip "$T_CLIP" "$PY" -m mmloss.bench --loss clip --sizes 32768 --dim 768 --dtype bfloat16 \
  --backends triton --peers "$PEERS_CLIP" --repeats 10 --device cuda --time-limit $((T_CLIP - 15)) \
  --json "$OUTDIR/bench_clip.json" --csv "$OUTDIR/bench.csv"
section siglip "$T_SIGLIP" "$PY" -m mmloss.bench --loss siglip --sizes 65536 --dim 768 --dtype bfloat16 \
  --backends triton --peers "$PEERS_SIGLIP" --repeats 5 --device cuda --time-limit $((T_SIGLIP - 15)) \
  --json "$OUTDIR/bench_siglip.json" --csv "$OUTDIR/bench.csv"

# --- the 1M-row CLIP must complete ----------------------------------------------------------------
section clip1m "$T_CLIP1M" "$PY" benchmarks/gpu/kernel_bench.py --only clip1m --out "$OUTDIR/results.jsonl"

# --- predicted next to measured ----------------------------------------------------------------------
section compare "$T_COMPARE" "$PY" -m mmloss.bench --model "$MODEL" --paths fused,gemm --measured "$OUTDIR" \
  --json "$OUTDIR/model.json"

# --- the multi-process bench (NCCL), only with several GPUs ------------------------------------------
if [ "$DRY" = 1 ]; then
  NGPU=0
else
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
fi
NGPU=${NGPU:-0}
if [ "$NGPU" -ge 2 ] 2>/dev/null; then
  NPROC=${NPROC:-$(( NGPU < 8 ? NGPU : 8 ))}
  section nproc "$T_NPROC" "$PY" -m mmloss.bench --nproc "$NPROC" --device cuda --loss clip,siglip \
    --sizes "${NPROC_SIZES:-8192}" --dim 768 --dtype bfloat16 --backends triton --repeats 10 \
    --json "$OUTDIR/bench_nproc.json"
else
  say "=== nproc: not run ($NGPU GPU visible; the multi-process bench needs one GPU per rank, >= 2)"
fi

say "=== done in $((SECONDS - T0))s, status $STATUS; results in $OUTDIR"
if [ "$DRY" = 0 ] && [ -f "$OUTDIR/results.jsonl" ]; then
  say "--- results.jsonl"
  tee -a "$LOG" <"$OUTDIR/results.jsonl"
fi
exit "$STATUS"
