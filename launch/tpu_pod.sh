#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; JAX finds its peers through the TPU
# metadata (--multihost), so no coordinator flags are needed. The workdir must be shared (e.g. a gs:// bucket).
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG gs://bucket/run [overrides...]
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
zone=${2:?}; config=${3:?}; workdir=${4:?}
shift 4
repo=${FLOWJAX_REPO:?set FLOWJAX_REPO to the git URL of your flowjax checkout}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  [ -d flowjax ] || git clone $repo flowjax
  cd flowjax && pip install -q -e . 'jax[tpu]' &&
  python -m flowjax.train --multihost --config=$config --workdir=$workdir $*
"
