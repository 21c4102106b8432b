#!/usr/bin/env bash
# Writes requirements/*.txt, the exact versions `make install` and .ci/run install (run by
# `make lock`; README.md "Locked dependencies"). all.txt is resolved first (base + train +
# torch + dev); the others are resolved within it, so a package has one version everywhere.
# torch is the CPU build (2.13.0+cpu, a local wheel under --find-links): PyPI's Linux wheel is a
# CUDA build that would pull nvidia-* packages. gpu.txt is the one lock with CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
FIND_LINKS="${SIDREC_FIND_LINKS:-/opt/wheels}"
compile() {
    local out="$1"
    shift
    "$UV" pip compile pyproject.toml --quiet --python-version 3.11 \
        --find-links "$FIND_LINKS" --no-emit-find-links \
        --custom-compile-command "make lock" -o "requirements/$out" "$@"
}
# --upgrade: a refresh takes the newest releases the pins allow (a deliberate commit).
compile all.txt --upgrade --extra train --extra torch --extra dev \
    --override <(echo "torch==2.13.0+cpu")
compile base.txt -c requirements/all.txt
for extra in train torch dev; do
    compile "$extra.txt" -c requirements/all.txt --extra "$extra"
done
compile gpu.txt -c requirements/all.txt --extra gpu
if grep -l '^nvidia-' requirements/{all,base,train,torch,dev}.txt; then
    echo "CUDA wheels in a CPU lock (above): torch must stay the +cpu build" >&2
    exit 1
fi
