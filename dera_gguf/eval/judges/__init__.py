"""LLM judges of a sweep's samples (``dera-eval generate --judge``): MT-bench-style grading of each answer,
or win / tie / loss against the answers at a baseline λ, by any OpenAI-compatible chat endpoint.

:mod:`.prompts` (the judge prompts and what a reply says), :mod:`.client` (one request: retries, rate
limit), :mod:`.questions` (what is asked about which samples, and what the answers make of them),
:mod:`.judging` (a sweep's judge: a pool of requests, the judgments file, resuming).
"""

from .judging import JUDGMENTS_FILE, Judge, Judging
from .prompts import JudgePrompt, default_prompt, parse_rating, parse_verdict

__all__ = ["Judge", "Judging", "JudgePrompt", "JUDGMENTS_FILE", "default_prompt", "parse_rating", "parse_verdict"]
