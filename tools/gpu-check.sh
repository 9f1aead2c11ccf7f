#!/usr/bin/env bash
# One command for a machine with one CUDA GPU (about 8 minutes): the precision `amp: auto` picks
# on this card (native bf16 from compute capability 8.0, else fp16 with a GradScaler), the
# CUDA-marked tests (training and inference on the GPU in float32, bf16 and fp16 against the CPU),
# the training step at the paper's geometry (UNet 96-1536 with 4 residual units, batch
# 16 x 2 x 32 x 160 x 160) in float32 and bf16 with peak memory and steps per second, and the
# patch loader at that patch size with workers. Prints everything; exits non-zero on the first
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."
make .venv/.installed
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
PYTHONPATH=src .venv/bin/python -c "
import torch
from stepseg import model
major, minor = torch.cuda.get_device_capability(0)
dtype = model.autocast_dtype(torch.device('cuda'), 'auto')
how = 'bf16 (native' if dtype == torch.bfloat16 else 'fp16 with a GradScaler (no native bf16'
print(f'amp: {how}, compute capability {major}.{minor})')"
timeout 240 .venv/bin/pytest -m cuda -q -p no:cacheprovider
timeout 150 .venv/bin/python bench/train_step.py --paper-only --steps 5 --warmup 2
timeout 90 .venv/bin/python bench/loader.py --studies 2 --patch 32 160 160 --workers 8 --batch 16 \
    --batches 20 --slow-batches 1
