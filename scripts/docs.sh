#!/usr/bin/env bash
# Set up (scripts/setup.sh, the pinned docs/requirements.txt, Debian's chromium for the browser test) and build
# the documentation site into site/ with `mkdocs build --strict`. Idempotent; quick once set up.
# Extra arguments go to mkdocs build (e.g. -d /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Document the checkout this script is in, whatever the venv's editable install points at.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# playwright (the browser test's driver) must never download a browser: it drives the system chromium.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export NO_MKDOCS_2_WARNING=1  # material 9.7+ prints a banner about its successor on every build

stamp=.venv/.attnkit-docs
want="$(cat docs/requirements.txt constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip --disable-pip-version-check install -q -c constraints.txt -r docs/requirements.txt
  echo "$want" > "$stamp"
fi

if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

start=$(date +%s)
.venv/bin/python -m mkdocs build --strict -d site "$@"
echo "attnkit docs: built site/ in $(( $(date +%s) - start )) s"
