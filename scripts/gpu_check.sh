#!/usr/bin/env bash
# How the CUDA figures in docs/gpu.md were measured, on a lent GPU machine with no network.
#
#   bash scripts/gpu_check.sh CARRY_DIR
#
# CARRY_DIR holds a slimmed llama-cpp-python 0.3.36 sdist (llama_src.tgz, with its
# vendor/llama.cpp models/ and docs/ removed) and the wheels its build needs
# (scikit-build-core, pathspec, packaging, diskcache, jinja2, markupsafe,
# typing_extensions, gguf). The script builds llama-cpp-python with CUDA, times decoding
# (scripts/bench_decode.py, speculation included) on a synthetic ~0.9B-parameter model
# (random weights, 32k vocabulary, Q4_K_M) and a random LoRA adapter on it (scale chosen so
# that the aligned model's greedy drafts pass about as often as the demo pair's, 0.8), times
# dera-eval sweeps (scripts/bench_eval.py: score, generate, generate --speculative) on the model, then runs the exactness tests with
# every layer offloaded. Each stage has a time limit so that one lease holds them all;
# logs go to $OUT (or /tmp) as they come.
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
log=${OUT:-/tmp}
python3 - <<'PY'
import sys
sys.path.insert(0, "tests")
from tiny_models import TinyVocab, write_tiny_llama, write_tiny_lora
from dera_gguf.convert.quantize import quantize_gguf
write_tiny_llama("/tmp/bench-f32.gguf", seed=0, vocab=TinyVocab.default(n_vocab=32000), n_embd=2048, n_layer=16,
                 n_head=16, n_head_kv=4, n_ff=5632, n_ctx_train=4096)
quantize_gguf("/tmp/bench-f32.gguf", "/tmp/bench.gguf", "Q4_K_M")
write_tiny_lora("/tmp/bench-lora.gguf", seed=5, n_embd=2048, n_layer=16, n_ff=5632, rank=16, alpha=16, scale=0.15)
PY
export PYTHONUNBUFFERED=1
timeout ${DECODE_S:-170} python3 scripts/bench_decode.py --model /tmp/bench.gguf --aligned /tmp/bench-lora.gguf \
  --n-gpu-layers -1 --rounds ${ROUNDS:-3} 2>&1 | tee "$log/bench_decode.txt" || true
# dera-eval's sweep costs (issue 11: 11-λ score ≤ 1.2x one λ; 8-λ generate ≤ 3x), with llama.cpp's batch floor
timeout ${EVAL_S:-150} python3 scripts/bench_eval.py --model /tmp/bench.gguf --n-gpu-layers -1 --rounds ${ROUNDS:-3} \
  2>&1 | tee "$log/bench_eval.txt" || true
DERA_TEST_N_GPU_LAYERS=-1 timeout ${TESTS_S:-170} python3 -m pytest -q -p no:cacheprovider \
  ${GPU_TESTS:-tests/test_speculative.py tests/test_engine.py tests/test_lora.py} 2>&1 | tee "$log/tests.txt" || true
# dera-serve --parallel (issue 24: 4 concurrent clients >= 3x one alone, a 4-lam request <= 0.4x four requests,
# on a GPU); needs the serve extra's wheels (fastapi, uvicorn, httpx and theirs) in CARRY_DIR
printf '[pairs.bench]\nreference = { path = "/tmp/bench.gguf" }\naligned = [{ path = "/tmp/bench-lora.gguf" }]\n' \
  > /tmp/bench-models.toml
DERA_MODELS=/tmp/bench-models.toml timeout ${SERVE_S:-150} python3 scripts/bench_serve.py --pair bench \
  --n-gpu-layers -1 --rounds ${ROUNDS:-3} 2>&1 | tee "$log/bench_serve.txt" || true
