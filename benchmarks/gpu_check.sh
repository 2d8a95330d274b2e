#!/usr/bin/env bash
# The prepared GPU check: on a machine with one or more GPUs and jax with CUDA
# installed, from the repository root, in under 8 minutes:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else benchmarks/gpu
#
# 1. The ViT-B/16 CLIP step (open_clip's ViT-B-16 towers, 224 px, bfloat16
#    activations, AdamW) on synthetic data (jaxcl.trainer.synthetic: no dataset), at
#    global batches 256 and 1024 per GPU: the dense loss, the blockwise loss,
#    and microbatches of 256 with the blockwise loss, side by side in one run.
#    Prints and writes examples/s, MFU, step time and the compiled step's
#    peak memory (step_throughput.json).
# 2. The loss benchmark (value and gradient of the CLIP loss, dense and
#    blockwise) at 16,384 and 65,536 pairs on one GPU (loss_memory.json).
#
# jaxcl runs from this tree (PYTHONPATH); its other dependencies (flax, optax,
# orbax-checkpoint, tensorflow-datasets, grain, ml_collections, ...) must be
# importable. A machine without them and without network: `pip download -d
# .wheels <the list in pyproject.toml>` on a machine of the same Python and
# platform, carry .wheels, and this script installs from it. Results go in
# benchmarks/RESULTS.md ("GPU check"); nothing in the test suite runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deps='import flax, optax, orbax.checkpoint, ml_collections, grain, tensorflow_datasets, etils'
if ! python -c "$deps" 2>/dev/null; then
  if [ -d .wheels ]; then
    python -m pip install -q --no-index --find-links .wheels flax optax orbax-checkpoint \
      ml-collections grain tensorflow-datasets array-record etils tensorboardX tqdm \
      sentencepiece tokenizers ftfy regex scikit-learn pillow braceexpand \
      opencv-python-headless safetensors absl-py
  else
    echo "gpu_check: jaxcl's dependencies are missing and there is no .wheels folder" >&2
    exit 1
  fi
fi
python - <<'PY'
import jax
print('gpu_check:', jax.__version__, jax.devices())
assert jax.devices()[0].platform == 'gpu', 'no GPU: this check is for a GPU machine'
PY
gpus=$(python -c 'import jax; print(jax.device_count())')
batches="$((256 * gpus)),$((1024 * gpus))"
start=$SECONDS
timeout 330 python benchmarks/step_throughput.py --config configs/clip_vit_b16.py \
  --architecture ViT-B-16 --batch_sizes "$batches" --steps 10 \
  --variants 'loss.impl=blockwise;loss.impl=blockwise,microbatch_size=256' \
  --json "$out/step_throughput.json" 2>&1 | grep -v Warning | tee "$out/step_throughput.log" \
  || echo "gpu_check: the step benchmark failed or ran out of time (exit $?)"
echo "gpu_check: step throughput took $((SECONDS - start)) s"
start=$SECONDS
timeout 120 python benchmarks/loss_memory.py --platform cuda --devices 0 \
  --batches 16384,65536 --max_gb 120 --repeat_below 16384 \
  --json "$out/loss_memory.json" 2>&1 | tee "$out/loss_memory.log" \
  || echo "gpu_check: the loss benchmark failed or ran out of time (exit $?)"
echo "gpu_check: loss benchmark took $((SECONDS - start)) s; results in $out"
