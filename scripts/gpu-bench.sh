#!/usr/bin/env bash
# Continuous batching on an NVIDIA GPU (issue 16): build llama-cpp-python with CUDA
# from a carried sdist, offline, and run `zmesh bench engine` with every layer
# offloaded at 1, 3 and 8 requests in flight, batched and one at a time; JSON to $OUT.
#
# The GPU machine has nvcc, CMake, ninja, scikit-build-core, numpy, jinja2, aiohttp and
# prometheus-client (see /work/.library/device/KINDS.md) but no network. Carry:
#   - $WHEELS (default .whl/): the llama-cpp-python sdist and the wheels it lacks.
#     Fill it here, where pip has network:  scripts/gpu-bench.sh fetch
#   - the model: MODEL=/path/to/model.gguf, or the packaged gemma3 GGUF when it is
#     installed there (250 MB: over the 64 MiB a device call carries, so a session
#     brings it in parts into an ignored folder while the machine stays warm, or
#     points MODEL at a smaller GGUF it carries).
# Then on the GPU machine (e.g. the device tool's `run`, carry [".whl"]):
#   OUT=$OUT scripts/gpu-bench.sh
# Settings: CUDA_ARCH (90: H100/H200), LEVELS (1,3,8), SLOTS (8), REQUESTS (24),
# MAX_TOKENS (64), PROMPT_TOKENS (160), THREADS (4), VENV (/tmp/zmesh-gpu-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36 # pyproject.toml pins it; KV states name it

if [ "${1:-}" = fetch ]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --no-binary :all: -d "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
  # Python 3.12 on x86-64 there; pure or manylinux wheels of what the image lacks.
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" diskcache msgspec pyzmq structlog
  ls -l "$WHEELS"
  exit 0
fi

OUT=${OUT:?set OUT to the folder for the results}
CUDA_ARCH=${CUDA_ARCH:-90}
LEVELS=${LEVELS:-1,3,8}
SLOTS=${SLOTS:-8}
REQUESTS=${REQUESTS:-24}
MAX_TOKENS=${MAX_TOKENS:-64}
PROMPT_TOKENS=${PROMPT_TOKENS:-160}
THREADS=${THREADS:-4}
VENV=${VENV:-/tmp/zmesh-gpu-venv}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-bench.log") 2>&1

command -v nvcc >/dev/null || { echo "gpu-bench: nvcc not found" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
sdist=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION".tar.gz 2>/dev/null | head -1)
[ -n "$sdist" ] || { echo "gpu-bench: no llama-cpp-python sdist in $WHEELS (run: $0 fetch)" >&2; exit 1; }

# The image's packages (numpy, jinja2, scikit-build-core, cmake, ninja, aiohttp) stay
# visible; what it lacks comes from $WHEELS only.
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then
  echo "gpu-bench: building llama-cpp-python $LLAMA_VERSION with CUDA (sm_$CUDA_ARCH)"
  export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  t0=$(date +%s)
  "$VPY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation \
    --no-cache-dir "$sdist"
  echo "gpu-bench: built in $(($(date +%s) - t0)) s"
fi
"$VPY" -m pip install --no-index --find-links "$WHEELS" -q diskcache msgspec pyzmq structlog
"$VPY" -c 'import llama_cpp, sys; ok = llama_cpp.llama_supports_gpu_offload(); print("gpu offload:", ok); sys.exit(not ok)'

model_args=()
if [ -n "${MODEL:-}" ]; then model_args=(--model "$MODEL"); fi
cat /proc/loadavg | tee "$OUT/loadavg-before.txt"
PYTHONPATH=$PWD "$VPY" -m zmesh bench engine --concurrency "$LEVELS" --sequential \
  --gpu-layers -1 --slots "$SLOTS" --threads "$THREADS" --requests "$REQUESTS" \
  --max-tokens "$MAX_TOKENS" --prompt-tokens "$PROMPT_TOKENS" "${model_args[@]}" --json \
  >"$OUT/gpu-bench.json"
cat /proc/loadavg | tee "$OUT/loadavg-after.txt"
"$VPY" - "$OUT/gpu-bench.json" <<'PYEOF'
import json, sys
res = json.load(open(sys.argv[1]))
for r in res["runs"]:
    print(f"c={r['concurrency']:<2} {r['mode']:<10} {r['tokens_per_s']:8.1f} tok/s  "
          f"ttft mean {r['ttft_mean_s']:.3f} s p99 {r['ttft_p99_s']:.3f} s  e2e {r['e2e_mean_s']:.3f} s")
print("batched / sequential:", json.dumps(res.get("batched_over_sequential")))
PYEOF
