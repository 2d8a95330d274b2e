#!/usr/bin/env bash
# One host, all of its GPUs: the devices form the mesh's `data` axis and the
# config's batch_size is the global batch split over them.
#
#   launch/gpu_local.sh --config configs/simclr_cifar10.py --workdir workdirs/cifar10
#
# Needs jax with CUDA in the environment: pip install -U "jax[cuda12]"
set -euo pipefail
# Let XLA take most of the GPU memory up front, as it is meant to run.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
python - <<'PY'
import jax
gpus = [d for d in jax.devices() if d.platform == 'gpu']
if not gpus:
    raise SystemExit('launch/gpu_local.sh: jax sees no GPU; pip install -U "jax[cuda12]"')
print(f'{len(gpus)} GPU(s): {gpus[0].device_kind}')
PY
exec jaxcl train "$@"
