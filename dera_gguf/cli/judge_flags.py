"""dera-eval generate's judge flags: which judge (--judge single | pairwise), where it is, how it is asked.

    dera-eval generate --pair zephyr-7b --prompts hf:HuggingFaceH4/mt_bench_prompts --out runs/mt \\
        --judge single --judge-url http://127.0.0.1:8080/v1 --judge-model local

The key is read from an environment variable (OPENAI_API_KEY, or the one --judge-key-env names),
never from a flag, so it stays out of shell histories and process lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import click

from ..blend import parse_lams
from ..errors import DeRaError

DEFAULT_URL = "https://api.openai.com/v1"


def judge_options(fn: Callable) -> Callable:
    """The judge flags, handed to the command as their names (``judge``, ``baseline_lam``, ``judge_url`` ...)."""
    options = [
        click.option(
            "--judge",
            type=click.Choice(["single", "pairwise"]),
            default=None,
            help="An LLM judge of every answer: 'single' grades each 1-10 (MT-bench's single-answer grading), "
            "'pairwise' compares it with the answer at --baseline-lam, in both orders (win / tie / loss).",
        ),
        click.option(
            "--baseline-lam",
            default=None,
            metavar="LAM[,LAM...]",
            help="Pairwise: the λ each answer is compared with (several: one comparison each; added to --lams).",
        ),
        click.option(
            "--judge-url",
            default=None,
            help="The judge's OpenAI-compatible API, up to /v1 (llama-server, llama-cpp-python's server, dera-serve "
            f"or a hosted one) [default: $OPENAI_BASE_URL, else {DEFAULT_URL}].",
        ),
        click.option("--judge-model", default=None, help="The model field of the judge's requests."),
        click.option(
            "--judge-key-env",
            default=None,
            metavar="NAME",
            help="The environment variable holding the judge's API key [default: OPENAI_API_KEY; without it, "
            "no key is sent, as local servers want].",
        ),
        click.option(
            "--judge-prompt",
            type=click.Path(dir_okay=False, exists=True),
            default=None,
            help="A judge prompt of your own: {question}, {answer}, {history} (single) or {question}, {answer_a}, "
            "{answer_b}, {history_a}, {history_b} (pairwise); default: ours, in dera_gguf/data/.",
        ),
        click.option(
            "--judge-concurrency", type=click.IntRange(min=1), default=4, show_default=True, help="Requests at once."
        ),
        click.option("--judge-rpm", type=click.FloatRange(min=0, min_open=True), default=None, help="Requests/minute."),
        click.option(
            "--judge-retries",
            type=click.IntRange(min=0),
            default=3,
            show_default=True,
            help="Further tries of a request that timed out or got a 429/5xx (back-off 1, 2, 4 ... s).",
        ),
        click.option(
            "--judge-timeout", type=click.FloatRange(min=1), default=120, show_default=True, help="Seconds per try."
        ),
        click.option(
            "--judge-max-tokens",
            type=click.IntRange(min=1),
            default=512,
            show_default=True,
            help="The longest judge reply.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@dataclass(frozen=True)
class JudgeFlags:
    """The judge flags as given; :meth:`judge` turns them into a :class:`~dera_gguf.eval.Judge` (or None)."""

    judge: Optional[str]
    baseline_lam: Optional[str]
    judge_url: Optional[str]
    judge_model: Optional[str]
    judge_key_env: Optional[str]
    judge_prompt: Optional[str]
    judge_concurrency: int
    judge_rpm: Optional[float]
    judge_retries: int
    judge_timeout: float
    judge_max_tokens: int

    def to_judge(self):
        """The :class:`~dera_gguf.eval.Judge` these flags ask for, checked; None without --judge."""
        from ..eval import Judge

        if self.judge is None:
            names = ("baseline_lam", "judge_model", "judge_prompt", "judge_url", "judge_key_env", "judge_rpm")
            given = [f"--{name.replace('_', '-')}" for name in names if getattr(self, name) is not None]
            if given:
                raise DeRaError(f"{', '.join(given)}: for a judge; add --judge single or --judge pairwise")
            return None
        if not self.judge_model:
            raise DeRaError("--judge needs --judge-model (any name for a local server with one model)")
        if self.judge == "pairwise" and not self.baseline_lam:
            raise DeRaError("--judge pairwise needs --baseline-lam (e.g. 0 for the SFT model, 1 for the aligned one)")
        if self.judge == "single" and self.baseline_lam:
            raise DeRaError("--baseline-lam is for --judge pairwise; --judge single grades each answer alone")
        judge = Judge(
            self.judge,
            url=self.judge_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL,
            model=self.judge_model,
            key=self.key(),
            prompt=self.judge_prompt,
            baselines=tuple(parse_lams(self.baseline_lam)) if self.baseline_lam else (),
            concurrency=self.judge_concurrency,
            rpm=self.judge_rpm,
            retries=self.judge_retries,
            timeout=self.judge_timeout,
            max_tokens=self.judge_max_tokens,
        )
        judge.load_prompt()  # a prompt file without its placeholders is refused now, before anything runs
        return judge

    def key(self) -> Optional[str]:
        """The API key from the environment: --judge-key-env's variable (which must be set), or OPENAI_API_KEY."""
        if self.judge_key_env is None:
            return os.environ.get("OPENAI_API_KEY") or None
        key = os.environ.get(self.judge_key_env)
        if not key:
            raise DeRaError(f"--judge-key-env {self.judge_key_env}: that environment variable is not set")
        return key
