#!/usr/bin/env bash
# Creates .venv beside the repository root and installs pragnosia-pl into it (once; again when
# pyproject.toml changes). Sourced by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.pragnosia-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | cksum)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing torch==2.13.0 (CPU build) and pragnosia-pl[test] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Pinned here: an unpinned torch pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
cd "$ROOT"
