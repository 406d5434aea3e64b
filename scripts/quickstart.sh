#!/usr/bin/env bash
# Sets up .venv and trains the built-in default: configs/quickstart.yaml (stdlib code + docs, CPU, a few minutes).
# Extra arguments go to `pragnosia fit`, e.g. scripts/quickstart.sh --trainer.max_steps 50
# Logs, checkpoints and the expert store go under runs/quickstart (--trainer.default_root_dir DIR moves them all);
# --ckpt_path last resumes that folder's last checkpoint.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec pragnosia fit --config configs/quickstart.yaml "$@"
