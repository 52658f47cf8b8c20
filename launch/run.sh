#!/usr/bin/env bash
# Run the same hm3jax command on every TPU worker, retrying on failure (preemption).
# Usage: launch/run.sh NAME ZONE MODULE [ARGS...]   e.g. launch/run.sh my-tpu us-central2-b train --config_path configs/qwen2.5-1.5b.yaml
set -euo pipefail
name=${1:?name}; zone=${2:?zone}; module=${3:?module}; shift 3
tries=${HM3JAX_RETRIES:-3}
for i in $(seq 1 "$tries"); do
  if gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
      "cd ~/hm3jax && python -m hm3jax.$module $*"; then
    exit 0
  fi
  echo "attempt $i failed; retrying (runs resume from their last checkpoint)" >&2
  sleep 30
done
exit 1
