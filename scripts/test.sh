#!/usr/bin/env bash
# Sets up .venv, lints with ruff and runs the whole test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
ruff check .
ruff format --check --diff pragnosia_pl callbacks scripts tests >/dev/null 2>&1 || echo "note: ruff format would restyle some files"
exec python -m pytest "$@"
