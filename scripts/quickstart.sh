#!/usr/bin/env bash
# Sets up .venv and trains the built-in default: configs/quickstart.yaml (stdlib code + docs, CPU, a few minutes).
# Extra arguments go to `pragnosia fit`, e.g. scripts/quickstart.sh --trainer.max_steps 50
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec pragnosia fit --config configs/quickstart.yaml "$@"
