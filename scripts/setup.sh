#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv. Idempotent; safe to run on a
# fresh machine with only Python 3.11.
#   bash scripts/setup.sh        everything the tests and benchmarks need (scripts/test.sh)
#   bash scripts/setup.sh train  only what the main job needs: torch and truegrad[lightning]
#                                (scripts/train.sh)
# Environment knobs:
#   PYTHON      interpreter used to create the venv (default: python3.11, else python3)
#   VENV        where the venv lives (default: .venv)
#   TORCH_SPEC  the torch requirement installed first (default: torch==2.13.0, a CPU wheel here)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PROFILE=${1:-test}
case "$PROFILE" in
    train | test) ;;
    *) echo "[setup] unknown profile '$PROFILE': use 'train' or 'test' (the default)" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
pip_install() {
    # pip's index warnings about unreadable local mirrors are noise; real errors still fail the step.
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v -E "^WARNING: Location '.*' is ignored|^ERROR: pip's dependency resolver does not currently|^backpack-for-pytorch .* requires torchvision" || true; }
    return "${PIPESTATUS[0]}"
}

# 1. torch first, so that nothing later pulls a CUDA build (a bare `torch` requirement would).
echo "[setup] installing $TORCH_SPEC"
pip_install "$TORCH_SPEC"
if [ "$PROFILE" = train ]; then
    echo "[setup] installing truegrad[lightning]"
    pip_install -e ".[lightning]"
else
    # 2. backpack-for-pytorch declares torchvision, which does not exist for this torch build
    #    and breaks `import lightning`: install it without dependencies (its real ones,
    #    einops and unfoldNd, are the `backpack` extra).
    pip_install --no-deps "backpack-for-pytorch>=1.7"
    # 3. the project itself, editable, with its extras. (pip would complain that backpack's
    #    torchvision requirement is unmet: that is deliberate, and filtered above.)
    echo "[setup] installing truegrad[lightning,backpack,test,bench]"
    pip_install -e ".[lightning,backpack,test,bench]"
    # 4. peft (LoRA models of the real-architecture zoo) and its accelerate: --no-deps so that
    #    pip never touches torch; their other requirements (transformers, safetensors, psutil,
    #    pyyaml) are already in from step 3.
    pip_install --no-deps "peft>=0.13" "accelerate>=1.0" psutil
fi

bad=$("$VENV/bin/python" -m pip list 2>/dev/null | grep -i -E "^(nvidia-|torchvision )" || true)
if [ -n "$bad" ]; then
    echo "[setup] ERROR: packages that must not be installed (CUDA torch or torchvision):" >&2
    echo "$bad" >&2
    exit 1
fi
if [ "$PROFILE" = train ]; then
    modules="torch, lightning.pytorch, truegrad_lightning"
else
    modules="torch, lightning.pytorch, truegrad_lightning, backpack, peft"
fi
"$VENV/bin/python" -c "import $modules; print('[setup] ok ($PROFILE): torch', torch.__version__, '| lightning', lightning.pytorch.__version__)"
