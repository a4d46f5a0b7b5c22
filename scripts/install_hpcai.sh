#!/usr/bin/env bash
# Creates or refreshes the hpcai SDK's test environment (.venv-hpcai). hpcai 0.2 pins numpy<2
# while the project's .venv holds numpy 2 (vLLM), so the client lives in a venv of its own; the
# service tests run the client and its cookbook recipes from it as subprocesses talking HTTP to
# the server. Idempotent: does nothing when this script is unchanged since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv_lib.sh
VENV=${HPCAI_VENV:-.venv-hpcai}
KEY=$(sha256sum scripts/install_hpcai.sh scripts/venv_lib.sh | sha256sum | cut -d' ' -f1)
fresh "$VENV" "$KEY" && exit 0
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip_quiet "$VENV" install --quiet --upgrade pip
# hpcai requires torch: pinned first, so pip takes the local CPU wheel, never the CUDA build.
pip_quiet "$VENV" install --quiet "torch==2.13.0"
# pip would pick a pyarrow that needs numpy 2, which breaks `import datasets` (the recipes');
# pyarrow<23 rules out datasets>=5.1 (pyarrow>=24) and so transformers>=5.25 (a newer
# huggingface-hub): naming both spares the resolver minutes of backtracking.
pip_quiet "$VENV" install --quiet "hpcai==0.2.0" "pyarrow<23" "datasets<5.1" "transformers<5.25"
"$VENV/bin/python" -W ignore -c "import hpcai, datasets, hpcai.cookbook.recipes.math_rl.train, hpcai.cookbook.recipes.sl_basic"
mark_fresh "$VENV" "$KEY"
