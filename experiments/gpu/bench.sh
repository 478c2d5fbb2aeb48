#!/usr/bin/env bash
# The benchmark on the lent GPU machine (see experiments/gpu/README.md): installs the carried
# ml_collections wheel, then runs mln_jax.bench on synthetic data and the carried CIFAR-10 pack.
#   bash experiments/gpu/bench.sh NAME [--compute_dtype=bfloat16 ...]
set -euo pipefail
name=$1; shift
out=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The JSON is rewritten after every measurement ("complete": false until the end) and grep passes
# lines on at once, so a call stopped at its time limit keeps what it measured.
python3 -m mln_jax.bench --out="$out/$name.json" --data_dir=.data/cifar10 "$@" 2>&1 \
  | grep --line-buffered -v "^W0000\|^I0000" | tee "$out/$name.log"
