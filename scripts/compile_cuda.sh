#!/usr/bin/env bash
# Compile-only check of the CUDA backend (csrc/cuda/) on a machine without a GPU, so that a CUDA
# syntax, template or signature error fails CI. Needs nvcc (the CUDA toolkit, any 12.x/13.x)
# and the installed torch (a CPU wheel is enough); nothing is linked into the package and
# nothing runs on a device.
#
#   bash scripts/compile_cuda.sh            # every csrc/cuda/*.cu and *.cpp, then the signature check
#   bash scripts/compile_cuda.sh FILE...    # only these sources (.cu: device + host, .cpp: host)
#
# Steps:
#   1. each csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (-gencode arch=compute_XX,code=sm_XX),
#      -Xptxas -v: one line per kernel and architecture with its registers and spill bytes;
#   2. each csrc/cuda/*.cpp (the host glue: ATen, c10/cuda, torch/library.h) with nvcc as the
#      host-compiler driver;
#   3. tests/cuda_compile/signatures.cpp, linked against the CPU torch and run: every CUDA
#      kernel's C++ signature matches its schema in csrc/include/mmloss/schema.h (the check the
#      dispatcher makes when `import mmloss._C` registers them on a GPU machine).
# Flags are those of torch.utils.cpp_extension's CUDA builds (-std=c++20, the __CUDA_NO_HALF*
# defines, --expt-relaxed-constexpr) plus -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE, because the CPU
# wheel lacks c10/cuda/impl/cuda_cmake_macros.h. The sources include no ATen/cuda/CUDAContext.h
# (it needs the cuBLAS/cuSPARSE headers, which a CPU wheel does not bring; csrc/cuda/README.md).
#
# Environment: PYTHON (default python), NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc,
# else /usr/local/cuda/bin/nvcc), MMLOSS_CUDA_ARCHS (default "80 90"), CXX (host compiler for
# step 3, default g++). Objects go to a temporary directory, removed on exit.
# Exit status: 0 all compiled and matched; 1 a compile or check failed; 2 no nvcc / no torch.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ARCHS=${MMLOSS_CUDA_ARCHS:-"80 90"}
CXX_HOST=${CXX:-g++}

NVCC_BIN=${NVCC:-}
if [ -z "$NVCC_BIN" ]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC_BIN=$(command -v nvcc)
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC_BIN=$CUDA_HOME/bin/nvcc
  elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC_BIN=/usr/local/cuda/bin/nvcc
  fi
fi
if [ -z "$NVCC_BIN" ] || ! "$NVCC_BIN" --version >/dev/null 2>&1; then
  echo "compile_cuda.sh: nvcc not found (install the CUDA toolkit or set NVCC=/path/to/nvcc)" >&2
  exit 2
fi

if ! TORCH_DIR=$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))" 2>/dev/null); then
  echo "compile_cuda.sh: '$PY' cannot import torch" >&2
  exit 2
fi
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
INCLUDES=(-Icsrc/include -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" -I"$PY_INC")
COMMON=(-std=c++20 -O3 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D__CUDA_NO_HALF_OPERATORS__
        -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
        --expt-relaxed-constexpr -Xcompiler -fPIC)
GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_$a,code=sm_$a"); done

OUT=$(mktemp -d "${TMPDIR:-/tmp}/mmloss-cuda-compile.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

echo "compile_cuda.sh: $("$NVCC_BIN" --version | tail -1 | sed 's/^Build //'), torch $("$PY" -c 'import torch; print(torch.__version__)'), archs: $ARCHS"

# ptxas -v output → "  sm_90  lse_forward_kernel  regs 64  spill 0/0 B  smem 4608 B"
ptxas_summary() {
  awk '
    /Compiling entry function/ {
      match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2)
      match($0, /for '"'"'sm_[0-9a-z]*'"'"'/); arch = substr($0, RSTART + 5, RLENGTH - 6)
      n = split(name, parts, /[0-9]+/); short = name
      if (match(name, /dev[0-9]+[a-z_]+/)) { short = substr(name, RSTART, RLENGTH); sub(/^dev[0-9]+/, "", short) }
      tmpl = ""
      if (name ~ /I13__nv_bfloat16/) tmpl = tmpl "<bf16"; else if (name ~ /I6__half/) tmpl = tmpl "<f16"; else if (name ~ /IffE|IfEE/) tmpl = tmpl "<f32"
      if (name ~ /S3_EE/) tmpl = tmpl ",same>"; else if (name ~ /I13__nv_bfloat16fE|I6__halffE/) tmpl = tmpl ",f32>"; else if (tmpl != "") tmpl = tmpl ">"
      cur = sprintf("%-6s %-30s", arch, short tmpl)
    }
    /spill stores/ { match($0, /[0-9]+ bytes spill stores/); st = substr($0, RSTART, RLENGTH); split(st, a, " ")
                     match($0, /[0-9]+ bytes spill loads/); ld = substr($0, RSTART, RLENGTH); split(ld, b, " ")
                     spill = a[1] "/" b[1] }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15)
                              smem = 0; if (match($0, /[0-9]+ bytes smem/)) { s = substr($0, RSTART, RLENGTH); split(s, c, " "); smem = c[1] }
                              printf "  %s regs %3d  spill %s B  smem %5d B\n", cur, r, spill, smem }'
}

status=0
compile_cu() {
  local src=$1 obj
  obj=$OUT/$(basename "$src").o
  local t0=$SECONDS
  if ! "$NVCC_BIN" "${COMMON[@]}" "${GENCODE[@]}" -Xptxas -v "${INCLUDES[@]}" -c "$src" -o "$obj" >"$OUT/log" 2>&1; then
    grep -v "^ptxas info" "$OUT/log" >&2
    echo "FAILED  $src (nvcc, sm: $ARCHS)" >&2
    status=1
    return
  fi
  grep -E "warning|error" "$OUT/log" | grep -v "^ptxas info" >&2 || true
  echo "ok      $src  ($((SECONDS - t0)) s)"
  ptxas_summary <"$OUT/log"
}

compile_cpp() {
  local src=$1 obj
  obj=$OUT/$(basename "$src").o
  local t0=$SECONDS
  if ! "$NVCC_BIN" "${COMMON[@]}" "${INCLUDES[@]}" -c "$src" -o "$obj" >"$OUT/log" 2>&1; then
    cat "$OUT/log" >&2
    echo "FAILED  $src (host compiler through nvcc)" >&2
    status=1
    return
  fi
  echo "ok      $src  ($((SECONDS - t0)) s)"
}

check_signatures() {
  local t0=$SECONDS cuda_inc
  cuda_inc=$(dirname "$(dirname "$(readlink -f "$NVCC_BIN")")")/include
  if ! "$CXX_HOST" -std=c++20 -O0 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${INCLUDES[@]}" -I"$cuda_inc" \
      tests/cuda_compile/signatures.cpp -o "$OUT/signatures" -L"$TORCH_DIR/lib" -ltorch_cpu -lc10 \
      -Wl,-rpath,"$TORCH_DIR/lib" >"$OUT/log" 2>&1; then
    cat "$OUT/log" >&2
    echo "FAILED  tests/cuda_compile/signatures.cpp (build)" >&2
    status=1
    return
  fi
  if ! "$OUT/signatures" >"$OUT/log" 2>&1; then
    cat "$OUT/log" >&2
    echo "FAILED  signature check: a CUDA kernel does not match its schema (csrc/include/mmloss/schema.h)" >&2
    status=1
    return
  fi
  echo "ok      signatures: $(grep -c '^ok' "$OUT/log") ops match csrc/include/mmloss/schema.h  ($((SECONDS - t0)) s)"
}

if [ $# -gt 0 ]; then
  sources=("$@")
else
  sources=(csrc/cuda/*.cu csrc/cuda/*.cpp)
fi
for src in "${sources[@]}"; do
  [ -f "$src" ] || { echo "compile_cuda.sh: no such source: $src" >&2; status=1; continue; }
  case "$src" in
    *.cu) compile_cu "$src" ;;
    *.cpp) compile_cpp "$src" ;;
    *) echo "compile_cuda.sh: not a .cu or .cpp source: $src" >&2; status=1 ;;
  esac
done
if [ $# -eq 0 ]; then
  check_signatures
fi
if [ $status -eq 0 ]; then
  echo "compile_cuda.sh: all CUDA sources compiled for sm_${ARCHS// /, sm_} in $SECONDS s"
else
  echo "compile_cuda.sh: FAILED after $SECONDS s" >&2
fi
exit $status
