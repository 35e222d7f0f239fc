"""Several prompts in one ``/v1/completions`` request, as OpenAI's API and lm-evaluation-harness send them.

``"prompt"`` may be a list of texts or a list of token-id lists (lm-eval's ``local-completions``
sends ``[[ids...], ...]``, one list per request of its batch). Each prompt is answered as a
request of its own (on a slot beside the others when slots are on), and the answers are put
together in OpenAI's shape: the choices in prompt order, each prompt's ``n`` choices in a row,
``index`` counting across them; the usage summed.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

from .errors import ApiError
from .schema import CompletionRequest, Request, given

Prompt = Union[str, List[int]]


def several_prompts(body: Request) -> Optional[List[Prompt]]:
    """The prompts of a completion request that sends more than one; None for one prompt."""
    if not isinstance(body, CompletionRequest):
        return None
    prompt = body.prompt
    if not isinstance(prompt, list) or len(prompt) < 2 or not all(isinstance(p, (str, list)) for p in prompt):
        return None
    if given(body, "stream"):
        raise ApiError(
            400, f"a stream answers one prompt, got a list of {len(prompt)}: send one request each", "prompt"
        )
    return list(prompt)


def merge_answers(answers: Sequence[dict]) -> dict:
    """One completion answer holding the choices of ``answers`` (one per prompt), in order."""
    rows = [c for a in answers for c in a["choices"]]
    choices = [dict(c, index=i) for i, c in enumerate(rows)]
    usage = {
        key: sum(a["usage"][key] for a in answers) for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    return {**answers[0], "choices": choices, "usage": usage}
