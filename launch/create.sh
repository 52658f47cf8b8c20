#!/usr/bin/env bash
# Create a Cloud TPU VM. Usage: launch/create.sh NAME ZONE ACCELERATOR [RUNTIME]
#   ACCELERATOR: v4-8, v4-32, v5litepod-16, v5p-8, ...; RUNTIME: the TPU software version (default
#   by generation). HM3JAX_SPOT=1 creates a spot (preemptible) VM: launch/run.sh recreates it.
set -euo pipefail
name=${1:?usage: launch/create.sh NAME ZONE ACCELERATOR [RUNTIME]}; zone=${2:?zone}
acc=${3:?accelerator type, e.g. v4-32 or v5litepod-16}
case "$acc" in
  v4-*) default=tpu-ubuntu2204-base ;;
  v5litepod-*) default=v2-alpha-tpuv5-lite ;;
  v5p-*) default=v2-alpha-tpuv5 ;;
  v6e-*) default=v2-alpha-tpuv6e ;;
  *) default=tpu-ubuntu2204-base ;;
esac
runtime=${4:-$default}
spot=()
[ "${HM3JAX_SPOT:-0}" = 1 ] && spot=(--spot)
gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$acc" --version "$runtime" "${spot[@]}"
