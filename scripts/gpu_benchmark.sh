#!/usr/bin/env bash
# GPU benchmark of vibethinker-app in one command (target: under 8 minutes on an H100/H200/T4).
#
#   bash scripts/gpu_benchmark.sh            # reports go to $OUT (if set) or reports/gpu/
#
# What it runs (random weights with VibeThinker-1.5B's architecture; no download of real weights):
#   - transformers float16: dynamic cache (eager) vs static cache + torch.compile;
#   - llama.cpp F16 / Q8_0 / Q4_K_M with every layer on the GPU;
#   - each through the bare library, our backend and our HTTP API; 1, 4 and 8 users at once.
# It installs only what is missing: a CUDA build of llama-cpp-python is compiled in the
# background (CMAKE_ARGS=-DGGML_CUDA=on) while transformers is measured; if that build is not
# possible (no nvcc, no source, no network) the llama.cpp part is skipped with a note.
#
# Environment: PYTHON (interpreter, default .venv/bin/python or python3), OUT (report folder),
# LLAMA_CPP_SDIST (a llama-cpp-python source archive to build offline), BUILD_TIMEOUT_S (420).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
REPORT=${OUT:-$ROOT/reports/gpu}
mkdir -p "$REPORT"
LOG=$REPORT/gpu_benchmark.log
: >"$LOG"
say() { echo "[gpu-bench $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
START=$(date +%s)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
say "python: $($PY --version 2>&1) ($PY)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true

# 1. torch with CUDA: reuse the platform's; install the default (CUDA) wheel only if torch is absent.
if ! $PY -c "import torch" 2>/dev/null; then
  say "torch is missing: pip install torch (CUDA build)"
  $PY -m pip install -q torch >>"$LOG" 2>&1 || { say "cannot install torch: stop"; exit 1; }
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "torch $($PY -c 'import torch; print(torch.__version__)') sees no CUDA GPU: this script needs one. Stop."
  exit 1
fi

# 2. The app's own dependencies, only those missing (no upgrade of what the image has).
missing=$($PY - <<'EOF'
import importlib.util
need = {"transformers": "transformers>=5,<6", "gradio": "gradio>=6,<7", "fastapi": "fastapi", "httpx": "httpx",
        "yaml": "pyyaml", "pydantic": "pydantic>=2.7", "safetensors": "safetensors", "tokenizers": "tokenizers",
        "gguf": "gguf>=0.17", "prometheus_client": "prometheus_client", "numpy": "numpy"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  say "installing: $missing"
  # shellcheck disable=SC2086
  $PY -m pip install -q $missing >>"$LOG" 2>&1 || { say "cannot install $missing: stop"; exit 1; }
fi

# 3. llama-cpp-python with CUDA, built in the background while transformers runs.
LLAMA_OK=$REPORT/.llama_cuda_ok
rm -f "$LLAMA_OK"
has_cuda_llama() { $PY -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; }
build_llama() {
  if has_cuda_llama; then touch "$LLAMA_OK"; return 0; fi
  if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "no nvcc (CUDA toolkit) on this machine: cannot build llama.cpp with CUDA" >"$REPORT/llama_build.note"; return 1
  fi
  export PATH=$PATH:/usr/local/cuda/bin CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
  # "native" compiles for this GPU only: minutes instead of the half hour of every architecture.
  export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  version=$($PY -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || echo 0.3.36)
  src=${LLAMA_CPP_SDIST:-llama-cpp-python==$version}
  timeout "${BUILD_TIMEOUT_S:-420}" $PY -m pip install -q --no-deps --force-reinstall --no-binary llama-cpp-python \
    --no-build-isolation "$src" >"$REPORT/llama_build.log" 2>&1 \
    || timeout "${BUILD_TIMEOUT_S:-420}" $PY -m pip install -q --no-deps --force-reinstall --no-binary llama-cpp-python \
       "$src" >>"$REPORT/llama_build.log" 2>&1 \
    || { echo "pip could not build $src with CUDA (see llama_build.log)" >"$REPORT/llama_build.note"; return 1; }
  if has_cuda_llama; then touch "$LLAMA_OK"; else echo "built, but without GPU offload" >"$REPORT/llama_build.note"; fi
}
if has_cuda_llama; then
  say "llama-cpp-python already has CUDA"; touch "$LLAMA_OK"; BUILD_PID=""
else
  say "building llama-cpp-python with CUDA in the background (log: llama_build.log)"
  build_llama & BUILD_PID=$!
fi

# 4. The random 1.5B model (CPU work), its F16 and Q8_0 GGUFs in the background (numpy only;
#    Q4_K_M needs llama.cpp's quantizer and waits for the build).
say "building the random 1.5B model (cached in ~/.cache/vibethinker-app/bench)"
$PY -c "from bench.models import hf_model; print(hf_model('vibethinker-1.5b'))" >>"$LOG" 2>&1 \
  || { say "cannot build the bench model: stop (see $LOG)"; exit 1; }
$PY -c "
from bench.models import hf_model, gguf_model
f = hf_model('vibethinker-1.5b')
for q in ('Q8_0', 'F16'):
    gguf_model(f, q)
" >"$REPORT/convert.log" 2>&1 & CONVERT_PID=$!

# 5. transformers on the GPU (eager vs static + compile), 1/4/8 users.
say "transformers: eager vs static cache + torch.compile"
$PY scripts/benchmark.py --device cuda --quick --out "$REPORT/transformers" \
  --engines transformers-float16 transformers-float16-static-compile 2>&1 | tee -a "$LOG"

# 6. llama.cpp fully offloaded, if the CUDA build exists.
say "waiting for the GGUF conversions and the llama.cpp build"
wait "$CONVERT_PID" || say "GGUF conversion failed (see convert.log)"
[ -n "$BUILD_PID" ] && wait "$BUILD_PID"
if [ -f "$LLAMA_OK" ]; then
  say "llama.cpp: F16 / Q8_0 / Q4_K_M, all layers on the GPU"
  $PY scripts/benchmark.py --device cuda --quick --out "$REPORT/llamacpp" \
    --engines llamacpp-F16 llamacpp-Q8_0 llamacpp-Q4_K_M 2>&1 | tee -a "$LOG"
else
  say "llama.cpp SKIPPED: $(cat "$REPORT/llama_build.note" 2>/dev/null || echo 'no CUDA build')"
fi
say "done in $(( $(date +%s) - START )) s; reports: $REPORT/transformers/benchmark.md $REPORT/llamacpp/benchmark.md"
rm -f "$LLAMA_OK"
