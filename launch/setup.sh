#!/usr/bin/env bash
# Copy this checkout to every TPU worker and install requirements-tpu.txt (jax[tpu], ...) and hm3jax.
# Usage: launch/setup.sh NAME ZONE
# Environment: HM3JAX_BUCKET  a GCS bucket mounted with gcsfuse at /mnt/runs on every worker, so run
#              directories (output_dir: /mnt/runs/...) outlive a preempted VM and a retry resumes.
set -euo pipefail
name=${1:?usage: launch/setup.sh NAME ZONE}; zone=${2:?zone}
root=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$root" --exclude .git --exclude .venv --exclude runs --exclude zoo -czf /tmp/hm3jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/hm3jax.tgz "$name":~/hm3jax.tgz --zone "$zone" --worker=all
mount=""
if [ -n "${HM3JAX_BUCKET:-}" ]; then
  mount="&& (mountpoint -q /mnt/runs || (sudo mkdir -p /mnt/runs && sudo chown \$USER /mnt/runs \
    && gcsfuse --implicit-dirs ${HM3JAX_BUCKET} /mnt/runs))"
fi
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "mkdir -p ~/hm3jax && tar -C ~/hm3jax -xzf ~/hm3jax.tgz && cd ~/hm3jax \
   && python3 -m pip install -q -r requirements-tpu.txt && python3 -m pip install -q -e . \
   && python3 -c 'import jax, hm3jax; print(\"jax\", jax.__version__)' $mount"
