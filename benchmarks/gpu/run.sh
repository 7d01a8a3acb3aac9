#!/usr/bin/env bash
# The triton backend's GPU check, in one command (issue 4; see benchmarks/gpu/README.md):
#
#   bash benchmarks/gpu/run.sh [--out DIR] [--dry-run] [--skip SECTION[,SECTION...]]
#
# Sections, each under its own time limit, each writing its results under the output folder as
# soon as they are measured ($OUT when set, else bench-out/gpu-<timestamp>):
#   env      GPU, driver, versions                                   -> env.txt
#   wheels   install peer wheels carried in .whl/ (no network)       -> run.log
#   tests    GPU test subset (correctness, determinism, N·D ≥ 2³¹)   -> gpu_tests.xml, run.log
#   kernels  mmloss vs its GEMM floor: CLIP 32768, SigLIP 65536      -> results.jsonl
#   clip     python -m mmloss.bench, CLIP 32768 bf16 with peers      -> bench_clip.json, bench.csv
#   siglip   python -m mmloss.bench, SigLIP 65536 bf16 with peers    -> bench_siglip.json, bench.csv
#   clip1m   CLIP N = M = 1,048,576 completes                        -> results.jsonl
#   nproc    only when >= 2 GPUs are visible: python -m mmloss.bench --nproc N (NCCL, one GPU per
#            rank), CLIP and SigLIP gather / ring vs open_clip, B_local 8192 bf16 -> bench_nproc.json
#            (its tables go to run.log; re-print with --from-json)
# Time limits (seconds) can be overridden: T_TESTS, T_KERNELS, T_CLIP, T_SIGLIP, T_CLIP1M, T_NPROC;
# NPROC (default: every visible GPU, at most 8), NPROC_SIZES (per-rank batch sizes, default 8192).
# Budget: under 6 minutes on an H200 from a cold Triton cache (plus T_NPROC on a multi-GPU
# machine). Works on torch 2.11 / Triton 3.6.
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
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUTDIR" ]; then
  OUTDIR="bench-out/gpu-$(date +%Y%m%d-%H%M%S)"
fi

T_TESTS=${T_TESTS:-120}
T_KERNELS=${T_KERNELS:-70}
T_CLIP=${T_CLIP:-50}
T_SIGLIP=${T_SIGLIP:-50}
T_CLIP1M=${T_CLIP1M:-55}
T_NPROC=${T_NPROC:-120}
WORKERS=${WORKERS:-8}
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

# section NAME LIMIT COMMAND...: run COMMAND under `timeout LIMIT`, appending to run.log
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
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
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

# --- env ----------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  say "=== env: nvidia-smi + versions -> $OUTDIR/env.txt"
else
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
    git -C "$ROOT" rev-parse HEAD 2>/dev/null
  } >"$OUTDIR/env.txt"
  tee -a "$LOG" <"$OUTDIR/env.txt"
fi

# --- wheels: peers come as pre-downloaded wheels in .whl/ (README.md says how to fetch them) ----
SITE=${TMPDIR:-/tmp}/mmloss-gpu-site
if ls .whl/*.whl >/dev/null 2>&1; then
  section wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  say "=== wheels: none in .whl/ (peers missing here are reported as unavailable)"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- tests ----------------------------------------------------------------------------------------
XDIST=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  XDIST=(-n "$WORKERS")   # parallel workers compile the kernel variants in parallel (cold cache)
fi
section tests "$T_TESTS" env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
  benchmarks/gpu/gpu_checks.py --junitxml="$OUTDIR/gpu_tests.xml"

# --- kernels vs floor ---------------------------------------------------------------------------
section kernels "$T_KERNELS" "$PY" benchmarks/gpu/kernel_bench.py --only clip,parts,siglip \
  --out "$OUTDIR/results.jsonl" --repeats 10 --time-limit $((T_KERNELS - 25))

# --- peers through the benchmark command ----------------------------------------------------------
section clip "$T_CLIP" "$PY" -m mmloss.bench --loss clip --sizes 32768 --dim 768 --dtype bfloat16 \
  --backends triton --peers "$PEERS_CLIP" --repeats 10 --device cuda --time-limit $((T_CLIP - 15)) \
  --json "$OUTDIR/bench_clip.json" --csv "$OUTDIR/bench.csv"
section siglip "$T_SIGLIP" "$PY" -m mmloss.bench --loss siglip --sizes 65536 --dim 768 --dtype bfloat16 \
  --backends triton --peers "$PEERS_SIGLIP" --repeats 5 --device cuda --time-limit $((T_SIGLIP - 15)) \
  --json "$OUTDIR/bench_siglip.json" --csv "$OUTDIR/bench.csv"

# --- the 1M-row CLIP must complete ----------------------------------------------------------------
section clip1m "$T_CLIP1M" "$PY" benchmarks/gpu/kernel_bench.py --only clip1m --out "$OUTDIR/results.jsonl"

# --- the multi-process bench (NCCL), only with several GPUs ------------------------------------------
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
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
