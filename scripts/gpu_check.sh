#!/usr/bin/env bash
# How the CUDA figures in the README were measured, on a lent GPU machine with no network.
#
#   bash scripts/gpu_check.sh CARRY_DIR
#
# CARRY_DIR holds a slimmed llama-cpp-python 0.3.36 sdist (llama_src.tgz, with its
# vendor/llama.cpp models/ and docs/ removed) and the wheels its build needs
# (scikit-build-core, pathspec, packaging, diskcache, jinja2, markupsafe,
# typing_extensions, gguf). The script builds llama-cpp-python with CUDA, runs the
# exactness tests with every layer offloaded, and times decoding on a synthetic
# ~0.9B-parameter model (random weights, 32k vocabulary) written with gguf-py, and
# times dera-eval sweeps (scripts/bench_eval.py) on the same model.
# --exclude-libs,ALL hides the libstdc++ copy the CUDA link exports from libggml-cuda.so (else loads crash in print_info).
set -euo pipefail
carry=${1:?usage: gpu_check.sh CARRY_DIR}
tar xzf "$carry/llama_src.tgz" -C /tmp
python3 -m pip install -q --no-index --no-deps --target /tmp/bdeps "$carry"/*.whl
export PYTHONPATH=/tmp/bdeps
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=off -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL ${EXTRA_CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip wheel -q --no-build-isolation --no-deps -w /tmp/wheel /tmp/slim
echo "CUDA build of llama-cpp-python: $(( $(date +%s) - start )) s"
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheel/*.whl
export PYTHONPATH=/tmp/site:/tmp/bdeps:$PWD
python3 -c "import llama_cpp; print('GPU offload supported:', llama_cpp.llama_supports_gpu_offload())"
python3 - <<'PY'  # smoke test first: load a tiny model offloaded, in verbose mode so a crash shows where
import faulthandler, sys
faulthandler.enable()
sys.path.insert(0, "tests")
from tiny_models import write_tiny_llama
import llama_cpp
write_tiny_llama("/tmp/smoke.gguf", seed=1)
llm = llama_cpp.Llama("/tmp/smoke.gguf", n_gpu_layers=-1, n_ctx=256, verbose=True)
print("smoke test:", repr(llm.create_completion("hello", max_tokens=4, temperature=0)["choices"][0]["text"]))
PY
DERA_TEST_N_GPU_LAYERS=-1 python3 -m pytest -q -p no:cacheprovider -x ${GPU_TESTS:-tests/test_engine.py tests/test_lora.py tests/test_errors.py}
python3 - <<'PY'
import sys
sys.path.insert(0, "tests")
from tiny_models import TinyVocab, write_tiny_llama
write_tiny_llama("/tmp/bench.gguf", seed=0, vocab=TinyVocab.default(n_vocab=32000), n_embd=2048, n_layer=16,
                 n_head=16, n_head_kv=4, n_ff=5632, n_ctx_train=4096)
PY
python3 scripts/bench_decode.py --model /tmp/bench.gguf --n-gpu-layers -1 --rounds ${ROUNDS:-5}
# dera-eval's sweep costs (issue: 8-λ generate ≤ 3x one generation), with llama.cpp's batch floor
python3 scripts/bench_eval.py --model /tmp/bench.gguf --n-gpu-layers -1 --rounds ${ROUNDS:-5}
