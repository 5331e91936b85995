#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the main job: a small CNN on the
# 8x8 digits bundled with scikit-learn, trained with TrueGrad-AdamW (backend patch_torch).
# Extra arguments go to the CLI, e.g. `bash scripts/train.sh --trainer.max_epochs=3`;
# TRUEGRAD_CONFIG picks another file of configs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/truegrad-lightning" fit --config "${TRUEGRAD_CONFIG:-configs/digits_cnn.yaml}" "$@"
