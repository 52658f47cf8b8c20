#!/usr/bin/env bash
# Run `python -m hm3jax.train --config_path CONFIG [OVERRIDES...]` on every worker of a Cloud TPU VM
# at once (multi-host JAX: the same command on every host, jax.distributed initialised by
# --mesh.distributed true), retrying when a worker fails or the VM is preempted. Each retry runs the
# same command, which resumes from the run directory's checkpoints (output_dir must be on storage that
# outlives the VM: see launch/README.md).
#
# Usage: launch/run.sh NAME ZONE CONFIG [OVERRIDES...]
#   e.g. launch/run.sh my-tpu us-central2-b configs/llama2-13b.yaml --mesh.fsdp -1 --output_dir /mnt/runs/13b
# Environment:
#   HM3JAX_RETRIES   attempts in all (default 5); HM3JAX_WAIT seconds between them (default 60)
#   HM3JAX_RECREATE  1: a preempted or deleted VM is recreated (launch/create.sh) and set up again
#                    (launch/setup.sh); needs HM3JAX_ACCELERATOR (e.g. v4-32) and optionally HM3JAX_RUNTIME
#   HM3JAX_MODULE    module to run instead of train (e.g. recommend)
set -euo pipefail
name=${1:?usage: launch/run.sh NAME ZONE CONFIG [OVERRIDES...]}
zone=${2:?zone}; config=${3:?config file, e.g. configs/llama2-13b.yaml}; shift 3
here=$(cd "$(dirname "$0")" && pwd)
tries=${HM3JAX_RETRIES:-5}; wait_s=${HM3JAX_WAIT:-60}; module=${HM3JAX_MODULE:-train}
[ -f "$here/../$config" ] || { echo "error: $config: no such file in this checkout (CONFIG is relative to its root)" >&2; exit 2; }
args=$(printf ' %q' --config_path "$config" --mesh.distributed true "$@")

vm_state() {
  gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format='value(state)' 2>/dev/null || echo MISSING
}

for i in $(seq 1 "$tries"); do
  state=$(vm_state)
  case "$state" in
    READY) ;;
    PREEMPTED|TERMINATED|MISSING)
      if [ "${HM3JAX_RECREATE:-0}" != 1 ]; then
        echo "error: TPU VM $name is $state; set HM3JAX_RECREATE=1 HM3JAX_ACCELERATOR=... to recreate it" >&2
        exit 1
      fi
      echo "TPU VM $name is $state: recreating it (attempt $i of $tries)" >&2
      [ "$state" = MISSING ] || gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet || true
      "$here/create.sh" "$name" "$zone" "${HM3JAX_ACCELERATOR:?HM3JAX_ACCELERATOR, e.g. v4-32}" ${HM3JAX_RUNTIME:-} \
        && "$here/setup.sh" "$name" "$zone" || { sleep "$wait_s"; continue; } ;;
    *) echo "TPU VM $name is $state; waiting" >&2; sleep "$wait_s"; continue ;;
  esac
  status=0
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
    "cd ~/hm3jax && PATH=\$HOME/.local/bin:\$PATH python3 -m hm3jax.$module$args" || status=$?
  [ "$status" = 0 ] && exit 0
  # Exit status 2 is a config error (the same on every attempt): do not retry it.
  [ "$status" = 2 ] && { echo "error: the run refused its config (exit 2); not retrying" >&2; exit 2; }
  echo "attempt $i of $tries failed (exit $status); retrying in ${wait_s}s: the run resumes from its checkpoints" >&2
  sleep "$wait_s"
done
echo "error: $tries attempts failed" >&2
exit 1
