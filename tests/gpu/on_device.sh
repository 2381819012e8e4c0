#!/usr/bin/env bash
# Everything a lent GPU machine checks, in one call of the device tool (docs/gpu.md):
#   here, once:     bash tests/gpu/wheels.sh
#   on the device:  run(command="bash tests/gpu/on_device.sh", carry=[".whl"], timeout_s=595)
# (the phases' limits add up to about 9.5 minutes with the install and the build)
# Installs the wheels, builds the fused op against the machine's torch and nvcc, runs
# `pytest -m gpu` and the two GPU benchmarks, each under its own time limit so that what
# finished comes back: $OUT/device.txt, build.log, gpu-tests.log (+ .xml), optimizer.json
# (+ .log), train.json (+ .log).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/megatrain-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, deepspeed; print(torch.cuda.get_device_name(), '| torch', torch.__version__, 'cuda',
torch.version.cuda, '| deepspeed', deepspeed.__version__)"; } > "$OUT/device.txt" 2>&1
# sm_90 alone (H100, H200): half the nvcc time of the default 80;90
MEGATRAIN_CUDA_ARCHES=${MEGATRAIN_CUDA_ARCHES:-90} python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || echo "fused op build failed (tail of build.log below)"
tail -3 "$OUT/build.log"
phase() {  # name, seconds, command...: run under a limit, say how it ended
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "$name: exit $? after ${SECONDS}s"
}
# -v: a line per test as it ends, so a phase cut short still says what passed (quick tests first)
phase gpu-tests 240 python3 -m pytest -v -m gpu tests/gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
# DeepSpeed builds its FusedAdam just in time (nvcc) before the first row: room for it.
phase optimizer 100 python3 bench/optimizer.py --device cuda --json "$OUT/optimizer.json"
phase train 150 python3 bench/train.py --device cuda --models gpt3-125m --precisions bf16 --steps 4 --repeat 1 \
  --json "$OUT/train.json"
cat "$OUT/device.txt"; tail -25 "$OUT/gpu-tests.log"; tail -14 "$OUT/optimizer.log"; tail -10 "$OUT/train.log"
