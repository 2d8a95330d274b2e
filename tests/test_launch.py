"""The launch scripts' --dry-run prints exactly what they would run."""

import os
import subprocess

from helpers import REPO

IMAGENET = ['--config', 'configs/simclr_imagenet.py', '--workdir', 'gs://bucket/simclr imagenet']


def _dry_run(script, *args):
  proc = subprocess.run(['bash', os.path.join(REPO, 'launch', script), *args], capture_output=True,
                        text=True, check=False,
                        env=dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=''))
  return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_gpu_local_dry_run():
  code, lines, _ = _dry_run('gpu_local.sh', '--dry-run', *IMAGENET)
  assert code == 0
  assert lines == ['XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 jaxcl train --config '
                   'configs/simclr_imagenet.py --workdir gs://bucket/simclr\\ imagenet']


def test_slurm_dry_run():
  code, lines, _ = _dry_run('slurm.sbatch', '--dry-run', '--config', 'configs/clip_vit_b16.py',
                            '--workdir', '/shared/clip', '--config.dataset.name=laion')
  assert code == 0
  assert lines == ['srun --kill-on-bad-exit=1 jaxcl train --config configs/clip_vit_b16.py '
                   '--workdir /shared/clip --config.dataset.name=laion']
  header = open(os.path.join(REPO, 'launch', 'slurm.sbatch')).read()
  assert '#SBATCH --gpus-per-task=1' in header  # one process per GPU


def test_tpu_pod_dry_run():
  code, lines, _ = _dry_run('tpu_pod.sh', '--dry-run', '--tpu', 'pod', '--zone', 'us-central2-b',
                            '--', *IMAGENET)
  assert code == 0
  assert lines == [
      f'git -C {REPO} archive --format=tar.gz -o /tmp/jaxcl.tar.gz HEAD',
      'gcloud compute tpus tpu-vm scp /tmp/jaxcl.tar.gz pod:~/jaxcl.tar.gz '
      '--zone us-central2-b --worker=all',
      'gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --command '
      '"rm -rf ~/jaxcl && mkdir ~/jaxcl && tar xzf ~/jaxcl.tar.gz -C ~/jaxcl && cd ~/jaxcl && '
      "pip install -q -e . 'jax[tpu]' && jaxcl train --config configs/simclr_imagenet.py "
      '--workdir gs://bucket/simclr\\ imagenet"',
  ]
  code, _, err = _dry_run('tpu_pod.sh', '--dry-run', '--zone', 'z')
  assert code == 2 and '--tpu NAME and --zone ZONE are required' in err
