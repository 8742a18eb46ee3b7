#!/usr/bin/env bash
# Download, on a machine with registry access, the Python packages the GPU machine lacks, as
# wheels for its Python (CPython 3.12, manylinux x86_64), into .whl/ (git-ignored). The GPU
# protocol (scripts/gpu_check.sh) installs whatever it finds there with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl ; PYTHONPATH=/tmp/site
# Carry the folder to the device: the device tool's `carry` argument must name ".whl".
#
# What the GPU image already has (/work/.library/device/KINDS.md): torch 2.11, torchvision,
# numpy, matplotlib, tqdm, rich, pytest (+xdist, timeout), opencv-python-headless, scikit-learn,
# pillow, huggingface-hub, safetensors, pyyaml, and some timm. So only these travel:
#   timm      1.0.31 (the pinned version: the benchmarks' peer and the conversion tests' source)
#   grad-cam  1.5.7  (interop tests; no wheel on the index: built here from the sdist, pure Python)
#   ttach     0.0.3  (grad-cam's one dependency missing there; its others: numpy, Pillow, torch,
#                     torchvision, tqdm, opencv-python-headless, matplotlib, scikit-learn, scipy,
#                     are all in the image)
# Usage: bash scripts/fetch_gpu_wheels.sh [PACKAGE==VERSION ...]   (default: the list above)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
pins() { grep -iE "^$1==" requirements-dev.txt | head -1; }
if [ $# -gt 0 ]; then
  specs=("$@")
else
  specs=("$(pins timm || echo timm==1.0.31)" "$(pins grad-cam || echo grad-cam==1.5.7)" "ttach==0.0.3")
fi
mkdir -p .whl
grep -qxF "/.whl/" .gitignore 2>/dev/null || grep -qxF "/.whl/" .git/info/exclude 2>/dev/null \
  || echo "/.whl/" >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for spec in "${specs[@]}"; do
  name=${spec%%==*}
  norm=$(echo "$name" | tr '-' '_' | tr 'A-Z' 'a-z')
  # keep one version of each package: two wheels of one name stop the whole install there
  for old in .whl/*.whl; do
    [ -e "$old" ] || continue
    b=$(basename "$old" | cut -d- -f1 | tr 'A-Z' 'a-z')
    [ "$b" = "$norm" ] && rm -f "$old"
  done
  if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
       --implementation cp "${plat[@]}" -d .whl "$spec" 2>"$tmp/err"; then
    echo "fetched  $spec (wheel from the index)"
    continue
  fi
  # no wheel for that platform: build one from the sdist, accepted only if it is pure Python
  rm -rf "$tmp/w" && mkdir -p "$tmp/w"
  if "$PY" -m pip wheel -q --no-deps -w "$tmp/w" "$spec" 2>"$tmp/err2"; then
    w=$(ls "$tmp"/w/*.whl)
    case "$w" in
      *-none-any.whl) mv "$w" .whl/ && echo "built    $spec (pure-Python wheel from the sdist)" ;;
      *) echo "FAILED   $spec: the sdist builds a platform wheel ($(basename "$w")), not usable there" >&2; status=1 ;;
    esac
  else
    echo "FAILED   $spec: $(tail -2 "$tmp/err") $(tail -2 "$tmp/err2")" >&2
    status=1
  fi
done
echo
ls -la .whl
du -sh .whl | awk '{print "total: " $1 " (the device tool carries at most 64 MiB in all)"}'
for w in .whl/*.whl; do
  deps=$(unzip -p "$w" '*.dist-info/METADATA' 2>/dev/null | grep '^Requires-Dist' | grep -v 'extra ==' \
         | sed 's/Requires-Dist: //' | tr '\n' ';')
  echo "  $(basename "$w"): requires ${deps:-nothing}"
done
exit $status
