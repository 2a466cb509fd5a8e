#!/usr/bin/env bash
# Create .venv with the pinned CPU toolchain and install deepcut_fast into it (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-ci.txt
# no build isolation: build against the torch installed above, never a freshly fetched one
.venv/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
