"""A pair of random-weight llama models of a real model's size, for timing where weights, not arithmetic, bound a step.

    python scripts/make_random_pair.py OUT_DIR [--n-embd 2048] [--n-layer 16] [--n-ff 5632] [--quant Q4_0]

The demo pair (SmolLM2-135M) fits a CPU's caches, so its steps are bound by arithmetic
and a batch of 4 tokens costs about 4 tokens there. A 7B model on a laptop is bound by
reading its weights, where a batch costs far less than its tokens. Nothing of that size
can be downloaded here, so this writes two random models of a chosen size (the tests'
tiny vocabulary and chat template, ~0.7B parameters by default), quantized with
llama.cpp's quantizer, and ``OUT_DIR/models.toml`` naming them pair ``random``:

    DERA_MODELS=OUT_DIR/models.toml python scripts/bench_serve.py --pair random

Their text is noise; only timings mean anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import write_tiny_llama  # noqa: E402

from dera_gguf.convert.quantize import quantize_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-embd", type=int, default=2048)
    parser.add_argument("--n-layer", type=int, default=16)
    parser.add_argument("--n-ff", type=int, default=5632)
    parser.add_argument("--quant", default="Q4_0")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, seed in [("reference", 1), ("aligned", 2)]:
        final = args.out / f"random-{role}-{args.quant.lower()}.gguf"
        if not final.exists():
            raw = args.out / f"random-{role}-f32.gguf.part"
            shape = dict(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_embd // 64, n_head_kv=4)
            write_tiny_llama(raw, seed=seed, n_ff=args.n_ff, n_ctx_train=4096, **shape)
            quantize_gguf(raw, final, args.quant)
            raw.unlink()
        files[role] = final
        print(f"{role}: {final} ({final.stat().st_size / 1e9:.2f} GB)")
    toml = args.out / "models.toml"
    toml.write_text(
        "[pairs.random]\n"
        f'description = "random weights, {args.n_layer} layers of {args.n_embd} (timing only)"\n'
        f'reference = {{ path = "{files["reference"]}" }}\n'
        f'aligned = [{{ path = "{files["aligned"]}" }}]\n'
    )
    print(f"pair 'random' in {toml}")


if __name__ == "__main__":
    main()
