#!/usr/bin/env bash
# A Cloud TPU pod slice: copy this checkout's committed code to every worker,
# install it with jax[tpu], and start `jaxcl train` on all workers at once (one process per
# host; jax.distributed finds the others itself). Use a gs:// workdir: every
# host writes its part of each checkpoint there.
#
#   launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project PROJECT] -- \
#       --config configs/simclr_imagenet.py --workdir gs://BUCKET/simclr_imagenet \
#       --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
#
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail
dry_run=0 tpu="" zone="" project=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launch/tpu_pod.sh: unknown option $1 (jaxcl's own flags go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "launch/tpu_pod.sh: --tpu NAME and --zone ZONE are required" >&2
  exit 2
fi
gcloud="gcloud compute tpus tpu-vm"
where="$tpu --zone $zone --worker=all${project:+ --project $project}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
args="$(printf '%q ' "$@")"
# The committed code travels as a tarball (no virtualenvs or workdirs).
remote="rm -rf ~/jaxcl && mkdir ~/jaxcl && tar xzf ~/jaxcl.tar.gz -C ~/jaxcl && cd ~/jaxcl"
remote+=" && pip install -q -e . 'jax[tpu]' && jaxcl train ${args% }"
steps=(
  "git -C $repo archive --format=tar.gz -o /tmp/jaxcl.tar.gz HEAD"
  "$gcloud scp /tmp/jaxcl.tar.gz $tpu:~/jaxcl.tar.gz ${where#"$tpu "}"
  "$gcloud ssh $where --command \"$remote\""
)
for step in "${steps[@]}"; do
  if (( dry_run )); then echo "$step"; else eval "$step"; fi
done
