#!/usr/bin/env bash
# Regenerates the committed CPU results in benchmarks/results/cpu/: the default sweep of
# `python -m mmloss.bench` (the README's main command) with its table (default.txt), JSON, CSV and
# plot, headed by the command, machine and versions that produced them.
#
#   bash benchmarks/results/regenerate_cpu.sh          # run with the machine otherwise idle
#
# Extra arguments go to the benchmark (e.g. --time-limit 600 to lift the default sweep's limit).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
out=benchmarks/results/cpu
mkdir -p "$out"
cmd=("$PY" -m mmloss.bench --json "$out/default.json" --csv "$out/default.csv" --plot "$out/default.png" "$@")

cpus=$(nproc)
read -r load1 _ < /proc/loadavg
{
  echo "# mmloss CPU benchmark: the default sweep of python -m mmloss.bench"
  echo "# command: ${cmd[*]}"
  echo "# date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# git commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p') · $(lscpu | sed -n 's/^CPU(s): *//p') logical CPUs · $(lscpu | sed -n 's/^Thread(s) per core: *//p') thread(s) per core"
  echo "# memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) · kernel $(uname -r)"
  echo "# python $("$PY" -c 'import platform; print(platform.python_version())') · torch $("$PY" -c 'import torch; print(torch.__version__)') · triton $("$PY" -c 'import importlib.metadata as m; print(m.version("triton"))' 2>/dev/null || echo 'not installed')"
  echo "# load average before the run: $(cat /proc/loadavg)"
  if awk -v l="$load1" -v c="$cpus" 'BEGIN { exit !(l > 0.25 * c) }'; then
    echo "# WARNING: the 1-minute load average was $load1 on $cpus CPUs before the run: other processes"
    echo "# were using the machine, so these timings are contaminated. Regenerate on an idle machine."
  fi
  echo
} > "$out/default.txt"

start=$SECONDS
"${cmd[@]}" | tee -a "$out/default.txt"
echo >> "$out/default.txt"
echo "# wall time of the command: $((SECONDS - start)) s · load average after: $(cat /proc/loadavg)" >> "$out/default.txt"
echo "wrote $out/default.{txt,json,csv,png}"
