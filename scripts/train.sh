#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the main job: a small CNN on the
# 8x8 digits bundled with scikit-learn, trained with TrueGrad-AdamW (backend auto).
# Extra arguments go to the CLI, e.g. `bash scripts/train.sh --trainer.max_epochs=3`;
# TRUEGRAD_CONFIG picks another built-in config by name (truegrad-lightning configs lists
# them) or a config file by path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train  # only torch and truegrad[lightning]
VENV=${VENV:-.venv}
exec "$VENV/bin/truegrad-lightning" fit --config "${TRUEGRAD_CONFIG:-digits_cnn}" "$@"
