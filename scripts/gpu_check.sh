#!/usr/bin/env bash
# One-command GPU check (see scripts/gpu_check.py): numerics of the losses, the reduction helper,
# the forward pass, the EMA and the rollout log-probs on the CUDA device, and the scoring's peak
# memory. Needs torch, numpy and transformers only. Exit status 1 on any FAIL.
#   bash scripts/gpu_check.sh                 # the first CUDA device (CPU, with SKIPs, if none)
#   PYTHON=/path/to/python bash scripts/gpu_check.sh --device cpu
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" "$ROOT/scripts/gpu_check.py" "$@"
