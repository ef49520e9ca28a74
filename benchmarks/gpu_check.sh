#!/usr/bin/env bash
# The GPU check, one call on a machine with an NVIDIA GPU, a CUDA build of torch (>= 2.5)
# and nvcc; needs no network, and installs only the wheels carried in .whl (make gpu-wheels,
# then name .whl in the device tool's carry). From the repository root:
#
#   bash benchmarks/gpu_check.sh            # logs and JSON into $OUT (default build/gpu-check)
#
# 1. builds the extension with the CUDA kernels against the torch it finds (CMake, in
#    build/gpu, for this card's architecture only) and puts _C next to the sources and in
#    $OUT; with GPU_CHECK_PREBUILT=1 and a _C already there (carried), uses it instead;
# 2. benchmarks/cuda_check.py: every CUDA path against the float64 oracle at random sizes,
#    gradcheck, the card's copy and GEMM ceilings, and the op sweep;
# 3. benchmarks/compare.py --device cuda --quick: every workload against the loop.
# 4. with GPU_CHECK_FULL=1, compare.py --device cuda at full sizes (the model workloads).
# 5. with GPU_CHECK_BF16=W3 (model workloads), compare.py --dtype bfloat16 at full sizes.
# 6. with GPU_CHECK_PROFILE=W1,W3 (model workloads), where their time goes on the GPU
#    (in GPU_CHECK_PROFILE_DTYPE, float32 unless set).
# 7. benchmarks/gpu_candidates.py: W2 with the GPU-only choices (channels-last images, the
#    batch-norm passes' CUDA kernels) on and off, A/B in one process.
# 8. benchmarks/call_parts.py W3 in bfloat16: where one evaluate call's time goes.
# Each stage has a time limit. On an H200 (fifteenth session) the build took 4 minutes
# (winograd_conv.cpp then one file; its steps now compile as three in parallel), cuda_check
# 33 s, the quick comparison 18 s, the full one 2 minutes, bfloat16 W3 37 s, stage 7 9 s:
# with GPU_CHECK_FULL=1, GPU_CHECK_BF16=W3 and two profiles, plan on 8 minutes.
set -uo pipefail
OUT=${OUT:-build/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, sysconfig, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print('Python.h:', os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"
  nvcc --version | tail -2
  nproc
} 2>&1 | tee "$OUT/machine.txt"

# Wheels carried to a machine without a package registry (`make gpu-wheels`: loss-landscapes).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl \
    && export PYTHONPATH="/tmp/gpu-check-site:$PYTHONPATH"
fi

arch=$("$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
if [ "${GPU_CHECK_PREBUILT:-0}" = 1 ] && compgen -G "mlifast/_C*.so" >/dev/null; then
  # A _C built by an earlier run (it comes back in $OUT; carry it) when csrc/ has not changed.
  echo "== build skipped: $(ls mlifast/_C*.so)"
else
  echo "== build (sm_$arch)"
  rm -f mlifast/_C*.so
  if timeout 300 bash -c "cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMLIFAST_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=$arch -DPython_EXECUTABLE=$(command -v "$PY") \
      && cmake --build build/gpu -j $(nproc)" >"$OUT/build.log" 2>&1; then
    cp build/gpu/_C*.so mlifast/ "$OUT/"
    grep -E "warning|mlifast:" "$OUT/build.log" | head -20
  else
    echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1
  fi
fi

echo "== cuda_check"
timeout 200 "$PY" benchmarks/cuda_check.py --json "$OUT/sweep.json" 2>&1 | tee "$OUT/cuda_check.log" || status=1

echo "== compare --device cuda --quick"
timeout 200 "$PY" benchmarks/compare.py --device cuda --quick --json "$OUT/compare.json" 2>&1 \
  | tee "$OUT/compare.log" || status=1
if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
  echo "== compare --device cuda (full sizes)"
  models=$(cd benchmarks && "$PY" -c "import compare; print(','.join(w for w in compare.ALL_WORKLOADS if w != 'W4'))")
  timeout "${GPU_CHECK_FULL_S:-180}" "$PY" benchmarks/compare.py --device cuda --workloads "$models" --repeats 3 \
    --quiet-wait 0 --json "$OUT/compare_full.json" 2>&1 | tee "$OUT/compare_full.log" || status=1
fi
if [ -n "${GPU_CHECK_BF16:-}" ]; then  # e.g. GPU_CHECK_BF16=W3: the memory-bound regime
  echo "== compare --device cuda --dtype bfloat16 (full sizes: $GPU_CHECK_BF16)"
  timeout "${GPU_CHECK_FULL_S:-180}" "$PY" benchmarks/compare.py --device cuda --dtype bfloat16 \
    --workloads "$GPU_CHECK_BF16" --repeats 3 --quiet-wait 0 --json "$OUT/compare_bf16.json" 2>&1 \
    | tee "$OUT/compare_bf16.log" || status=1
fi
echo "== GPU candidates (W2)"
timeout 150 "$PY" benchmarks/gpu_candidates.py 2>&1 | tee "$OUT/candidates.log" || status=1
echo "== where one call's time goes (W3, bfloat16)"
timeout 60 "$PY" benchmarks/call_parts.py W3 --device cuda --dtype bfloat16 2>&1 | tee "$OUT/call_parts.log" || status=1
for workload in ${GPU_CHECK_PROFILE//,/ }; do
  echo "== profile $workload --device cuda"
  timeout 120 "$PY" benchmarks/profile_workload.py "$workload" --device cuda \
    --dtype "${GPU_CHECK_PROFILE_DTYPE:-float32}" 2>&1 \
    | tee "$OUT/profile_$workload.log" || status=1
done
exit $status
