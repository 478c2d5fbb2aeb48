#!/usr/bin/env bash
# Runs one config on the lent GPU machine (device tool), whose image has JAX and Flax but no
# ml_collections, clu or TensorFlow: ml_collections travels as a wheel in .whl/, the data pack in
# .data/cifar10/ (see experiments/gpu/README.md). Extra arguments go to mln_jax.main. Every
# results.json, config.json and comparison.json of the run comes back under $OUT/NAME/ with its path.
#   bash experiments/gpu/run.sh NAME CONFIG [--config.KEY=VALUE ...]
set -euo pipefail
name=$1; config=$2; shift 2
out=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$out/$name"
# grep --line-buffered: a call stopped at its time limit keeps the log up to its last line. A failed
# run still returns what finished (e.g. the first method of method=both), then its exit status.
set +e
python3 -m mln_jax.main --config="$config" --workdir="/tmp/runs/$name" \
  --config.data_dir=.data/cifar10 "$@" 2>&1 | grep --line-buffered -v "^W0000\|^I0000" \
  | tee "$out/$name.log"
status=${PIPESTATUS[0]}
set -e
(cd "/tmp/runs/$name" && find . \( -name results.json -o -name comparison.json -o -name config.json \) \
  -exec cp --parents {} "$out/$name/" \;)
exit "$status"
