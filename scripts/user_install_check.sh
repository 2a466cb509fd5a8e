#!/usr/bin/env bash
# The install path a user takes: a fresh environment that has only torch, then the package with
# its own declared requirements (not the CI pins), then the main job's smoke run, the backend
# check and the benchmark tests. Catches an import that a command reaches but setup.py lacks.
# Works on a copy of the tree, so the checkout's own build is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
    --exclude=./runs --exclude=__pycache__ -cf - . | (mkdir "$work/src" && tar -xf - -C "$work/src")
python3 -m venv "$work/venv"
pip=("$work/venv/bin/pip" --quiet --disable-pip-version-check)
# torch first, as a GPU machine's image has it (2.13.0 is the CPU wheel this machine holds);
# setuptools and wheel build the extension without build isolation
"${pip[@]}" install torch==2.13.0 setuptools wheel
(cd "$work/src" && "${pip[@]}" install --no-build-isolation -e .)
mkdir "$work/user" && cd "$work/user"  # run where a user would: outside the checkout
"$work/venv/bin/deepcut-fast" check
"$work/venv/bin/deepcut-fast" demo --quick --out "$work/user/demo"
cd "$work/src"
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider benchmarks --benchmark-disable
