#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels in bench/gpu_wheels.txt for the GPU
# machine's Python (CPython 3.12, manylinux x86_64) into .whl/ (git-ignored), for the device
# tool's `carry`. No dependencies are resolved (--no-deps): the list names every missing one.
#
#   bash bench/gpu_wheels.sh [PYTHON]     # PYTHON: any interpreter with pip (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
mkdir -p .whl
# manylinux tags are matched exactly: name the glibc levels these packages publish for
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
grep -v '^\s*\(#\|$\)' bench/gpu_wheels.txt | while read -r req; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl "$req"
done
# one version per package: a stale wheel of another version would stop the install there
for whl in .whl/*.whl; do
  name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
  version=$(basename "$whl" | cut -d- -f2)
  tr 'A-Z_' 'a-z-' <bench/gpu_wheels.txt | grep -q "^${name}==${version}\$" \
    || { echo "removing $whl (not in bench/gpu_wheels.txt)"; rm -f "$whl"; }
done
ls -l .whl
du -sh .whl
