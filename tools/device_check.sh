#!/usr/bin/env bash
# The CUDA backend's checks on a lent GPU machine, as one prepared command of the `device` tool.
#
# Once, on the development machine (the wheels travel with the working tree, ~41 MB; the GPU
# machine has no network and older onnx-ir / onnxruntime / transformers than xopt pins):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     onnx-ir==1.1.0 onnxruntime==1.32.0 transformers==5.23.0
# Then: device run, command "bash tools/device_check.sh", carry [".whl"], timeout_s 600.
#
# It builds the kernels for the GPU found, runs the kernel and whole-model GPU tests, then the
# benchmark (tools/benchmark_cuda.py); logs and benchmarks/CUDA.md come back under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XOPT_CACHE_DIR=/tmp/xopt-cache
OUT=${OUT:-/tmp/xopt-device-out}
mkdir -p "$OUT" /tmp/site/xopt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
cp -r xopt/. /tmp/site/xopt/ && cp -r passes /tmp/site/xopt/passes && cp -r backends /tmp/site/xopt/backends
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, onnxruntime, onnx_ir, transformers; print(torch.__version__, onnxruntime.__version__, onnx_ir.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 -c "
import torch, time
from xopt.backends.cuda.build import shared_library
major, minor = torch.cuda.get_device_capability()
t = time.time(); print(shared_library(f'sm_{major}{minor}'), f'built in {time.time() - t:.0f} s')" 2>&1 | tee "$OUT/build.log"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_build.py 2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests took $(( $(date +%s) - start )) s"
timeout 330 python3 tools/benchmark_cuda.py --output "$OUT/CUDA.md" 2>&1 | grep -v "it/s]" | tee "$OUT/benchmark.log" | tail -40
echo "all took $(( $(date +%s) - start )) s"
