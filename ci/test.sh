#!/usr/bin/env bash
# CPU runner: a fresh virtual environment, the project installed from pyproject.toml with its
# test extra, then the test command of README.md. Needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
bpk info
python -m pytest -q
