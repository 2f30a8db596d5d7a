#!/usr/bin/env bash
# One machine, all its accelerators (or CPU): python -m flowjax.train with the given config.
#   bash launch/local.sh configs/toy.py:grpo runs/toy [--config.train.steps=100 ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec python -m flowjax.train --config="$config" --workdir="$workdir" "$@"
