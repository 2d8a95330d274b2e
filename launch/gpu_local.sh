#!/usr/bin/env bash
# One host, all of its GPUs: one process; the GPUs form the mesh's `data`
# axis and the config's batch_size is the global batch split over them.
#
#   launch/gpu_local.sh [--dry-run] --config configs/simclr_imagenet.py --workdir workdirs/imagenet
#   launch/gpu_local.sh --config configs/clip_vit_b16.py --workdir workdirs/clip_b16 \
#       --config.dataset.name=YOUR_DATASET
#
# Needs jax with CUDA in the environment: pip install -U "jax[cuda12]".
# --dry-run prints the command instead of running it.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
# Let XLA take most of the GPU memory up front, as it is meant to run.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
command=(jaxcl train "$@")
if (( dry_run )); then
  args="$(printf '%q ' "${command[@]}")"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION ${args% }"
  exit 0
fi
python - <<'PY'
import jax
gpus = [d for d in jax.devices() if d.platform == 'gpu']
if not gpus:
    raise SystemExit('launch/gpu_local.sh: jax sees no GPU; pip install -U "jax[cuda12]"')
print(f'{len(gpus)} GPU(s): {gpus[0].device_kind}')
PY
exec "${command[@]}"
