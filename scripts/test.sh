#!/usr/bin/env bash
# Set up (scripts/setup.sh through scripts/docs.sh, which also builds the documentation site the browser test
# opens) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/docs.sh
exec .venv/bin/python -m pytest "$@"
