#!/usr/bin/env bash
# The README's test command: every test stage, each in its own pytest process, because the
# Triton interpreter must be switched on before import, the compile-only checks and torch.compile
# need it off, and the main suite stays free of compiles and process spawns.
#
#   stage              directory                budget   contents
#   main tests         tests/ (the rest)        4 min    reference oracle, torch backend, losses, API
#   compile            tests/compile/           4 min    torch.compile / opcheck of ops and losses
#   triton (interp.)   tests/triton_interpret/  6 min    triton kernels under TRITON_INTERPRET=1 on CPU
#   triton (gemm)      tests/triton_interpret/  5 min    the same suites forced onto the triton gemm path
#   triton (compile)   tests/triton_compile/    5 min    compile-only sm_90 / sm_80 checks (no GPU), incl. the
#                                                        register-spill matrix (~140 cold compiles; 2 xdist workers)
#   cuda (compile)     tests/cuda_compile/      3 min    nvcc -c of csrc/cuda for sm_80 / sm_90 (no GPU)
#   distributed        tests/distributed/       5 min    multi-process gloo tests: every loss x mode at W=2,3,4, ring memory
#   examples           tests/examples/          —        examples/ in --quick mode, as subprocesses
#   benchmark smoke    benchmarks/              —        pytest-benchmark suites, tiny, one round
#   docs build         docs/ + mkdocs.yml       —        mkdocs --strict (when the docs extra is installed)
#
# Budgets are wall-clock times on the reference machine: 2 CPU cores (AMD EPYC / Intel Xeon).
# Each stage prints its time against its budget; a stage that exceeds its budget by more than
# 50 % fails the script (a slow stage is a bug to fix: move heavy cases to smaller sizes).
# On slower machines set MMLOSS_STAGE_BUDGETS=off (report times, enforce nothing) or a factor,
# e.g. MMLOSS_STAGE_BUDGETS=3 (every budget × 3).
#
# Environment: PYTHON (default python); MMLOSS_HYPOTHESIS_EXAMPLES (see tests/conftest.py).
# Extra arguments are passed to every pytest call (e.g. -x, -k clip); a stage in which they
# select no test (pytest exit 5) is reported, not failed.
# Exit status: non-zero when any stage fails or runs over its budget (unless disabled).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGETS=${MMLOSS_STAGE_BUDGETS:-on}
case "$BUDGETS" in
  on|"") budget_factor=1 ;;
  off) budget_factor=0 ;;
  *)
    if [[ "$BUDGETS" =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v f="$BUDGETS" 'BEGIN { exit !(f > 0) }'; then
      budget_factor=$BUDGETS
    else
      echo "MMLOSS_STAGE_BUDGETS must be 'on', 'off' or a positive factor, got '$BUDGETS'" >&2
      exit 2
    fi ;;
esac

status=0
summary=()
# run NAME BUDGET_SECONDS COMMAND...   (BUDGET_SECONDS 0: no budget)
run() {
  local name=$1 budget=$2; shift 2
  echo "=== $name: $*"
  local t0 t1 elapsed verdict="tests passed"
  t0=$(date +%s.%N)
  "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then
    verdict="no tests selected"  # pytest's exit 5, e.g. a -k filter matching nothing here
  elif [ $rc -ne 0 ]; then
    status=1
    verdict="tests FAILED (exit $rc)"
  fi
  t1=$(date +%s.%N)
  elapsed=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }')
  local line
  if [ "$budget" -gt 0 ]; then
    line=$(printf '%-22s %5d s  (budget %4d s)' "$name" "$elapsed" "$budget")
    if [ "$budget_factor" != 0 ]; then
      local allowed
      allowed=$(awk -v b="$budget" -v f="$budget_factor" 'BEGIN { printf "%.0f", 1.5 * b * f }')
      if [ "$elapsed" -gt "$allowed" ]; then
        status=1
        verdict="$verdict, OVER BUDGET (> $allowed s = 1.5 x budget x $budget_factor)"
      elif [ "$elapsed" -gt "$(awk -v b="$budget" -v f="$budget_factor" 'BEGIN { printf "%.0f", b * f }')" ]; then
        verdict="$verdict, over budget (within the 50 % margin)"
      fi
    fi
  else
    line=$(printf '%-22s %5d s  (no budget)    ' "$name" "$elapsed")
  fi
  echo "=== $name finished in $elapsed s: $verdict"
  summary+=("$line  $verdict")
}

run "main tests" 240 env -u TRITON_INTERPRET "$PY" -m pytest -q tests \
  --ignore=tests/triton_interpret --ignore=tests/triton_compile --ignore=tests/compile \
  --ignore=tests/distributed --ignore=tests/examples --ignore=tests/cuda_compile "$@"
if [ -d tests/compile ]; then
  run "compile" 240 env -u TRITON_INTERPRET "$PY" -m pytest -q tests/compile "$@"
fi
if [ -d tests/triton_interpret ]; then
  run "triton (interpreter)" 360 env TRITON_INTERPRET=1 "$PY" -m pytest -q tests/triton_interpret "$@"
fi
if [ -d tests/triton_interpret ]; then
  # The same suites on the triton backend's gemm path (vendor GEMM blocks + fused epilogues),
  # forced, with 4 KiB blocks so chunk edges cut rows and columns unevenly. test_modes captures
  # fused launches and test_gemm_path / test_fp32_precision_api choose their paths themselves.
  run "triton (interp., gemm)" 300 env TRITON_INTERPRET=1 MMLOSS_TRITON_PATH=gemm MMLOSS_GEMM_PATH_BYTES=4KiB \
    "$PY" -m pytest -q tests/triton_interpret --ignore=tests/triton_interpret/test_modes.py \
    --ignore=tests/triton_interpret/test_gemm_path.py --ignore=tests/triton_interpret/test_fp32_precision_api.py "$@"
fi
if [ -d tests/triton_compile ]; then
  # Compiles are single-threaded (ptxas): two workers use both cores when pytest-xdist is here.
  xdist=()
  if "$PY" -c "import xdist" >/dev/null 2>&1; then xdist=(-n 2); fi
  run "triton (compile-only)" 300 env -u TRITON_INTERPRET "$PY" -m pytest -q "${xdist[@]}" tests/triton_compile "$@"
fi
if [ -d tests/cuda_compile ]; then
  run "cuda (compile-only)" 180 env -u TRITON_INTERPRET "$PY" -m pytest -q tests/cuda_compile "$@"
fi
if [ -d tests/distributed ]; then
  run "distributed" 300 env -u TRITON_INTERPRET "$PY" -m pytest -q tests/distributed "$@"
fi
if [ -d tests/examples ]; then
  run "examples" 0 env -u TRITON_INTERPRET "$PY" -m pytest -q tests/examples "$@"
fi
if [ -d benchmarks ] && ls benchmarks/test_*.py >/dev/null 2>&1; then
  run "benchmark smoke" 0 env -u TRITON_INTERPRET MMLOSS_BENCH_SMOKE=1 "$PY" -m pytest -q benchmarks \
    --benchmark-disable-gc --benchmark-min-rounds=1 --benchmark-warmup=off "$@"
fi

# The documentation site, warnings as errors (mkdocs + mkdocstrings: the "docs" extra); the
# API pages import nothing, so a docstring or link that breaks the build fails here.
if "$PY" -c "import mkdocs, mkdocstrings" >/dev/null 2>&1; then
  run "docs build" 0 env MMLOSS_DOCS_SITE="${TMPDIR:-/tmp}/mmloss-docs-site" bash scripts/build_docs.sh --quiet
else
  echo "=== docs build: skipped (mkdocs/mkdocstrings not installed: pip install -e '.[docs]')"
fi

echo "=== stage times (budgets for 2 cores; MMLOSS_STAGE_BUDGETS=$BUDGETS)"
printf '%s\n' "${summary[@]}"
exit $status
