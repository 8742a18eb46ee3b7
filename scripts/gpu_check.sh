#!/usr/bin/env bash
# The GPU protocol (issue 7): build for this device, run the whole test suite, compute-sanitizer
# over the kernel tests, copy bandwidth, the layer and network benchmarks; results (at most 8
# files) in one folder; a summary table printed last. The steps live in scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh [DIR]                     the 15-minute lease's first command (8 min):
#                                                       every step once at reduced sizes
#   bash scripts/gpu_check.sh --part extra [DIR]        then, with 6+ min of device time left (5 min):
#                                                       initcheck, synccheck, tuning sweep, wider
#                                                       benchmark grid, the whole test suite
#   bash scripts/gpu_check.sh --part verify|measure|all [DIR]   longer leases (9.5, 9.5, 20 min)
#   bash scripts/gpu_check.sh --dry-run [DIR]           a machine without a GPU: every step it can, on the CPU
#   python3 scripts/gpu_check.py merge DIR1 DIR2 -o benchmarks/results/<date>-<device>
#
# DIR defaults to $OUT (the device tool's output folder), else out/gpu_check-<date>.
# Knobs: PYTHON (the interpreter; default .venv/bin/python if present, else python3),
# GPU_CHECK_SANITIZE_FILE (default: tests/test_kernels_gpu.py or tests/test_kernels_cuda.py),
# GPU_CHECK_SANITIZE_K (a pytest -k selection), GPU_CHECK_KERNEL_FILTER (compute-sanitizer kernel-name substring, default cbam;
# empty: every kernel). `--help` lists the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHON="$PY"
exec "$PY" -u scripts/gpu_check.py "$@"
