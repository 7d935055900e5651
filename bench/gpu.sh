#!/usr/bin/env bash
# The prepared GPU check of issue 10, sized to a few minutes on one H100:
# a Qwen2-architecture model of 0.5B parameters from a config, bf16 mixed precision, activation
# checkpointing, a DPO step and a GRPO step (generation included), alignspec and TRL 1.16 on the
# same model and data: step time, tokens/s, peak GPU memory, ratios (bench/gpu.py).
#
#   bench/gpu.sh                      # on a machine with a CUDA GPU
#   bench/gpu.sh --tiny               # the same script on a tiny config (runs on a CPU)
#   PYTHON=/path/to/python bench/gpu.sh --steps 6
#
# Needs, in $PYTHON (default: .venv/bin/python if present, else python3): torch with CUDA,
# transformers, accelerate, datasets, peft, trl==1.16.* and this package (pip install -e ".[bench]").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [[ " $* " != *" --tiny "* ]]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device for torch " + torch.__version__ + " (use --tiny on a CPU)")'
  "$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)'
fi
"$PY" -c 'import trl, alignspec; print("trl", trl.__version__)'
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu.py "$@"
