#!/usr/bin/env bash
# Creates .venv-old: the tools the Hub-era fixtures were written with (transformers 4.37.2, tokenizers 0.15,
# torch 2.13 CPU). Only needed to regenerate tests/data/hub_era/; the tests read the committed folder.
#   bash tests/tools/make_old_venv.sh && .venv-old/bin/python tests/tools/make_hub_era_fixtures.py
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-old
.venv-old/bin/pip install -q "torch==2.13.0" "transformers==4.37.2" "tokenizers==0.15.*" "numpy<2" \
    "sentencepiece>=0.2" "protobuf>=4" "safetensors>=0.4" "pillow>=10"
.venv-old/bin/python -c "import torch, transformers, tokenizers; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
