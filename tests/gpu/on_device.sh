#!/usr/bin/env bash
# Everything a lent GPU machine checks, in one call of the device tool (docs/gpu.md):
#   here, once:     bash tests/gpu/wheels.sh
#   on the device:  run(command="bash tests/gpu/on_device.sh", carry=[".whl"], timeout_s=560)
# The whole call ends by DEADLINE seconds (default 530: under 9 minutes, leaving room in a
# 15-minute lease for a second try). In order, each phase limited to its own share and to
# what is left before the deadline:
#   install the wheels; build the fused op (sm_90) against the machine's torch and nvcc;
#   build DeepSpeed's JIT ops (FusedAdam with nvcc) into MEGATRAIN_OPS_DIR, where the runs
#     load them without building (docs/self-healing.md);
#   pytest -m gpu, most important tests first, each test's outcome written as it ends;
#   bench/optimizer.py, then bench/train.py, with what time is left.
# pytest is stopped with SIGINT at its limit, so it still writes its summary and junit file.
# What comes back in $OUT (the device tool returns at most 8 files): device.txt, setup.log,
# gpu-tests.log, gpu-results.jsonl, gpu-tests.xml, optimizer.json, train.json, bench.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/megatrain-gpu}
DEADLINE=${DEADLINE:-530}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/setup.log" 2>&1 || { echo "wheel install failed"; cat "$OUT/setup.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export MEGATRAIN_GPU_RESULTS="$OUT/gpu-results.jsonl" MEGATRAIN_OPS_DIR=/tmp/megatrain-ops
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, deepspeed; print(torch.cuda.get_device_name(), '| torch', torch.__version__, 'cuda',
torch.version.cuda, '| deepspeed', deepspeed.__version__)"; } > "$OUT/device.txt" 2>&1

phase() {  # name, seconds, log, command...: run under min(seconds, time left), say how it ended
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then echo "$name: not run, ${left}s left" | tee -a "$OUT/device.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" >> "$log"
  timeout -s INT -k 20 "$limit" "$@" >> "$log" 2>&1
  echo "$name: exit $? after ${SECONDS}s (limit ${limit}s)" | tee -a "$OUT/device.txt"
}
# sm_90 alone (H100, H200; with PTX for later GPUs): half the nvcc time of the default 80;90
MEGATRAIN_CUDA_ARCHES=${MEGATRAIN_CUDA_ARCHES:-90} phase build 150 "$OUT/setup.log" python3 setup.py -q build_ext --inplace
phase warm-ops 150 "$OUT/setup.log" python3 launch/warm_ops.py
# -v: a line per test as it ends in the log, and gpu-results.jsonl has each outcome
phase gpu-tests 330 "$OUT/gpu-tests.log" python3 -m pytest -v -m gpu tests/gpu -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml"
phase optimizer 60 "$OUT/bench.log" python3 bench/optimizer.py --device cuda --json "$OUT/optimizer.json"
phase train 100 "$OUT/bench.log" python3 bench/train.py --device cuda --models gpt3-125m --precisions bf16 --steps 4 \
  --repeat 1 --json "$OUT/train.json"
cat "$OUT/device.txt"; tail -4 "$OUT/setup.log"; tail -30 "$OUT/gpu-tests.log"; tail -24 "$OUT/bench.log"
