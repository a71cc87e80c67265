#!/usr/bin/env bash
# The speed checks that need a GPU, as one prepared script for a session lent a device
# machine: `bash benchmarks/gpu_check.sh` there (about 5 minutes on an H100; no data needed: random
# weights and tensors; set IGRAD_DATA for real test images where a copy is there).
#   DEVICE=cpu SCALE=small bash benchmarks/gpu_check.sh    # a quick dry run of the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PY:-python}
if [ "${SCALE:-full}" = small ]; then
    IMAGES=2 N=4 BASE=2 WIDTH=0.125
else
    IMAGES=64 N=256 BASE=64 WIDTH=1
fi
$PY - <<PYEOF
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
echo "== saliency vs pytorch-grad-cam, CIFAR ResNet-18 width $WIDTH, batch $IMAGES (targets: >=1, ablationcam >=10, scorecam >=1.5)"
$PY benchmarks/saliency.py --device "$DEVICE" --width "$WIDTH" --images "$IMAGES" --repeats 3 || true
echo "== insertion + deletion vs the per-image RISE loop, $N images (target >=10)"
$PY benchmarks/metrics.py --device "$DEVICE" --width "$WIDTH" --n "$N" --baseline-images "$BASE" --blocks 4 || true
echo "== paper preset (docs/method.md §Networks and recipes, full width, batch 128): epoch time and epochs/s for λ = 0 and λ > 0, CIFAR ResNet-18"
if [ "${SCALE:-full}" = small ]; then STEPS=1; else STEPS=20; fi
$PY benchmarks/epoch_time.py --preset paper --device "$DEVICE" --models cifar_resnet18 --steps "$STEPS" --warmup 2 || true
