#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv with the pinned dependencies, builds the
# extension (CUDA sources with nvcc when a toolkit is present, GPU or not), then runs a job.
#   bash scripts/dev.sh test [pytest args]    the whole test suite
#   bash scripts/dev.sh bench [bench args]    the layer benchmark (benchmarks/bench_cbam.py)
#   bash scripts/dev.sh build                 set up and build only
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-test}
shift || true

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.deps-$(sha1sum requirements-dev.txt | cut -c1-12)
if [ ! -f "$stamp" ]; then
  # torch's CUDA build and its nvidia packages take about 6 GiB: say so before pip runs out
  free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ -n "$free_kib" ] && [ "$free_kib" -lt $((8 * 1024 * 1024)) ]; then
    echo "scripts/dev.sh: warning: $((free_kib / 1024)) MiB free here; installing the pinned" \
         "dependencies (torch's CUDA build) needs about 6 GiB" >&2
    df -h . >&2
  fi
  # grep drops pip notes about local package folders named in this machine's pip.conf; pipefail
  # keeps a failing install fatal
  python -m pip install -q -r requirements-dev.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
  touch "$stamp"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# g++ warnings in the project's host and simulator sources fail the build here (nvcc's always do)
export CBAM_FUSED_WERROR=${CBAM_FUSED_WERROR:-1}
if ! python -m pip install --no-build-isolation -e . >.venv/build.log 2>&1; then
  grep -v "^WARNING: Location" .venv/build.log | tail -60
  echo "scripts/dev.sh: building cbam_fused failed (full log: .venv/build.log)" >&2
  exit 1
fi
python -c "import cbam_fused" # fails loudly when the build did not produce the extension

case "$job" in
  test)  ruff check --quiet . && exec python -m pytest -q "$@" ;;
  bench) exec python benchmarks/bench_cbam.py "$@" ;;
  build) ;;
  *) echo "usage: scripts/dev.sh test|bench|build [args]" >&2; exit 2 ;;
esac
