#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `attnkit bench` on its quick default (under 5 minutes on 2 cores).
# Extra arguments go to `attnkit bench` (e.g. --full, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/attnkit bench "$@"
