"""Drive the real dera-chat: subprocesses for one-shot mode, a pseudo-terminal for the loop.

Expected answers come from separate engines (plain ``llama_cpp.Llama``, or a separate
DeRaLlama where the blend is needed), never from the CLI's own objects.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pexpect

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "you> "
STATUS = re.compile(
    r"(?:\x1b\[2m)?lam (\S+)(?: \(weights\))? · (\d+) tokens · [\d.]+ tok/s( · interrupted)?"
    r"(?: · drafts (\d+)/(\d+) passed)?(?:\x1b\[0m)?\r\n"
)
# The paper's Zephyr settings, which must be the CLI's defaults.
PAPER = dict(temperature=0.7, top_k=50, top_p=0.95, min_p=0.0, repeat_penalty=1.0)


def cli_env(models_toml: Optional[Path] = None, **extra: str) -> dict:
    """Environment running this worktree's code (not an installed copy) on ``models_toml``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8", TERM="dumb")
    env.pop("DERA_MODELS", None)
    if models_toml is not None:
        env["DERA_MODELS"] = str(models_toml)
    env.update(extra)
    return env


def run_cli(
    args: List[str], env: dict, stdin: Optional[str] = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """``python -m dera_gguf.cli.chat ARGS`` with ``stdin`` piped (empty when None)."""
    return subprocess.run(
        [sys.executable, "-m", "dera_gguf.cli.chat", *args],
        input=stdin or "",
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


def streamed(llm, messages: List[dict], **kwargs) -> str:
    """The text a streamed create_chat_completion call produces (what the CLI prints)."""
    chunks = llm.create_chat_completion(messages, stream=True, **kwargs)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def default_sigint() -> None:
    """Ctrl-C as a user's terminal delivers it: a shell running the tests in the background leaves
    SIGINT ignored, and a child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """dera-chat in a pseudo-terminal, spoken to like a user would."""

    def __init__(self, args: List[str], env: dict, timeout: float = 30):
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "dera_gguf.cli.chat", *args],
            env=env,
            encoding="utf-8",
            codec_errors="replace",
            timeout=timeout,
            cwd=str(ROOT),
            dimensions=(40, 4000),
            preexec_fn=default_sigint,
        )  # wide: long lines echo unwrapped
        self.child.expect_exact(PROMPT)

    def ask(self, text: str) -> tuple[str, re.Match]:
        """Send a message; return the printed answer and the status line's match."""
        self._send(text)
        self.child.expect(STATUS)
        return _answer_text(self.child.before), self.child.match

    def interrupt_answer(self, text: str) -> tuple[str, re.Match]:
        """Send a message, press Ctrl-C once the answer starts printing."""
        self._send(text)
        self.child.expect(r"(?s).")
        first = self.child.after
        time.sleep(0.02)  # let unread output pile up in the terminal, as a slow screen would
        self.child.sendintr()
        self.child.expect(STATUS)
        # the terminal echoes the key as "^C" (ECHOCTL) somewhere in the streamed text
        return _answer_text((first + self.child.before).replace("^C", "", 1)), self.child.match

    def command(self, line: str) -> str:
        """Run a slash command; return what it printed up to the next prompt."""
        self._send(line)
        self.child.expect_exact(PROMPT)
        return self.child.before.replace("\r\n", "\n")

    def sweep(self, line: str, n: int) -> List[tuple[str, str]]:
        """Run /sweep; return ``(lam label, answer)`` for each of ``n`` answers."""
        self._send(line)
        out = []
        for _ in range(n):
            self.child.expect(r"--- lam (\S+) ---(?:\x1b\[0m)?\r\n")
            label = self.child.match.group(1)
            self.child.expect(STATUS)
            out.append((label, _answer_text(self.child.before)))
        self.child.expect_exact(PROMPT)
        return out

    def quit(self, how: str = "/quit") -> int:
        if how == "eof":
            self.child.sendeof()
        else:
            self.child.sendline(how)
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus

    def _send(self, line: str) -> None:
        self.child.sendline(line)
        self.child.expect_exact(line + "\r\n")  # the terminal's echo of the typed line


def _answer_text(raw: str) -> str:
    """The answer as printed: the text between the echoed line and the newline before the status."""
    assert raw.endswith("\r\n"), repr(raw)
    raw = raw[:-2]
    if raw.endswith(" [interrupted]"):
        raw = raw[: -len(" [interrupted]")]
    return raw.replace("\r\n", "\n")
