#!/usr/bin/env bash
# Copy this checkout to every TPU worker and install it. Usage: launch/setup.sh NAME ZONE
set -euo pipefail
name=${1:?name}; zone=${2:?zone}
root=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$root" --exclude .git --exclude .venv -czf /tmp/hm3jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/hm3jax.tgz "$name":~/hm3jax.tgz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  'mkdir -p ~/hm3jax && tar -C ~/hm3jax -xzf ~/hm3jax.tgz && cd ~/hm3jax && pip install -q -r requirements-tpu.txt && pip install -q -e .'
