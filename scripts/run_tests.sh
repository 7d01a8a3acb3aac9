#!/usr/bin/env bash
# The README's test command: every test stage, each in its own pytest process, because the
# Triton interpreter must be switched on before import and the compile-only checks need it off.
#   stage 1  tests/                     main suite (reference oracle, torch backend, losses, API)
#   stage 2  tests/triton_interpret/    triton kernels under TRITON_INTERPRET=1 on the CPU
#   stage 3  tests/triton_compile/      compile-only sm_90 / sm_80 checks (no GPU needed)
#   stage 4  benchmarks/                pytest-benchmark suites in smoke mode (tiny, one round)
# Extra arguments are passed to every pytest call (e.g. -x, -k clip).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
run() {
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" || status=1
  echo "=== $name finished in $((SECONDS - t0)) s"
}
run "main tests" env -u TRITON_INTERPRET "$PY" -m pytest -q tests \
  --ignore=tests/triton_interpret --ignore=tests/triton_compile "$@"
if [ -d tests/triton_interpret ]; then
  run "triton (interpreter)" env TRITON_INTERPRET=1 "$PY" -m pytest -q tests/triton_interpret "$@"
fi
if [ -d tests/triton_compile ]; then
  run "triton (compile-only)" env -u TRITON_INTERPRET "$PY" -m pytest -q tests/triton_compile "$@"
fi
if [ -d benchmarks ] && ls benchmarks/test_*.py >/dev/null 2>&1; then
  run "benchmark smoke" env -u TRITON_INTERPRET MMLOSS_BENCH_SMOKE=1 "$PY" -m pytest -q benchmarks \
    --benchmark-disable-gc --benchmark-min-rounds=1 --benchmark-warmup=off "$@"
fi
exit $status
