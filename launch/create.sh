#!/usr/bin/env bash
# Create a Cloud TPU VM. Usage: launch/create.sh NAME ZONE ACCELERATOR [RUNTIME]
set -euo pipefail
name=${1:?name}; zone=${2:?zone}; acc=${3:?accelerator type, e.g. v5litepod-8}
runtime=${4:-v2-alpha-tpuv5-lite}
gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$acc" --version "$runtime"
