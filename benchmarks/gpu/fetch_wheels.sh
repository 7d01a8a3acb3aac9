#!/usr/bin/env bash
# Download the four peer wheels run.sh installs on the GPU box (which has no network) into .whl/:
# inf-cl, memeff, siglip-kernel and open-clip-torch, without their dependencies (torch, triton and
# numpy are on the GPU image; open_clip's loss.py is loaded by path). Run it here, on a machine
# that reaches PyPI, then carry .whl/ along (the device tool: carry=[".whl"]).
#
#   bash benchmarks/gpu/fetch_wheels.sh [--python-version 3.12]
#
# Pinned versions: one wheel of each in .whl/ (older ones are removed first).
set -euo pipefail

cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
PYVER=3.12
if [ "${1:-}" = "--python-version" ]; then
  PYVER=$2
fi
WHEELS=(inf-cl==1.2.1 memeff==0.3.1 siglip-kernel==0.1.2 open-clip-torch==3.3.0)

mkdir -p .whl
rm -f .whl/inf_cl-*.whl .whl/memeff-*.whl .whl/siglip_kernel-*.whl .whl/open_clip_torch-*.whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl/*.whl
